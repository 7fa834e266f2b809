package mirror_test

import (
	"context"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/shoal-oci/shoal/node/mirror"
	"github.com/shoal-oci/shoal/test/harness"
)

// TestRealContainerdPullsThroughMirror runs a real containerd v2 with the
// certs dir Configure wrote, and pulls docker.io/library/shoaltest:v1. The
// mirror (an in-memory registry on loopback) must see containerd's requests
// with ?ns=docker.io, and the pull must succeed from it alone. The operator's
// earlier server (a dead loopback port) is kept as the last resort, so
// nothing leaves the machine.
func TestRealContainerdPullsThroughMirror(t *testing.T) {
	ctrd := harness.StartContainerd(t, harness.ContainerdV2)

	var (
		mu   sync.Mutex
		seen []string
	)
	reg := registry.New(registry.Logger(log.New(io.Discard, "", 0)))
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		seen = append(seen, r.Method+" "+r.URL.RequestURI())
		mu.Unlock()
		reg.ServeHTTP(w, r)
	}))
	t.Cleanup(srv.Close)

	img := harness.RandomImage(t, 1, 512)
	ref, err := name.ParseReference(strings.TrimPrefix(srv.URL, "http://")+"/library/shoaltest:v1", name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.Write(ref, img); err != nil {
		t.Fatalf("push test image: %v", err)
	}
	mu.Lock()
	seen = nil
	mu.Unlock()

	hostsDir := filepath.Join(ctrd.CertsDir, "docker.io")
	if err := os.MkdirAll(hostsDir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(hostsDir, mirror.HostsFile), []byte("server = \"http://127.0.0.1:1\"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	cfg := mirror.DefaultConfig(ctrd.CertsDir, srv.URL)
	cfg.Registries = []string{"docker.io"}
	if err := mirror.Configure(context.Background(), cfg); err != nil {
		t.Fatal(err)
	}

	ctrd.Ctr(t, "images", "pull", "--all-platforms", "--hosts-dir", ctrd.CertsDir, "docker.io/library/shoaltest:v1")

	out := ctrd.Ctr(t, "images", "ls", "-q")
	if !strings.Contains(out, "docker.io/library/shoaltest:v1") {
		t.Fatalf("image not in containerd after pull:\n%s", out)
	}
	mu.Lock()
	defer mu.Unlock()
	var resolved bool
	for _, s := range seen {
		if strings.HasPrefix(s, "HEAD /v2/library/shoaltest/manifests/v1") && strings.Contains(s, "ns=docker.io") {
			resolved = true
		}
	}
	if !resolved {
		t.Fatalf("mirror never saw containerd resolve the tag; requests: %v", seen)
	}
}
