package bench

import (
	"context"
	"fmt"
	"net"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/distribution/distribution/v3/configuration"
	"github.com/distribution/distribution/v3/registry/handlers"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/shoal-oci/shoal/test/harness"
	"github.com/shoal-oci/shoal/test/hub"
)

// startRegistry runs a plain distribution v3 registry (no auth, no limits,
// filesystem storage) in process: the stand-in for a registry that a direct
// pull goes to.
func startRegistry(b *testing.B) string { return startDistribution(b, nil) }

// startDistribution runs distribution v3 in process on loopback, with
// filesystem storage and, when proxy is set, in proxy (pull-through) mode.
func startDistribution(b *testing.B, proxy *configuration.Proxy) string {
	b.Helper()
	dc := &configuration.Configuration{}
	dc.Log.Level = "error"
	dc.Log.AccessLog.Disabled = true
	dc.HTTP.Secret = "bench-secret"
	// Filesystem, like shoal cache's default: the inmemory driver copies its
	// buffer on every write and would make the proxy look slower than it is.
	dc.Storage = configuration.Storage{
		"filesystem":  configuration.Parameters{"rootdirectory": b.TempDir()},
		"maintenance": configuration.Parameters{"uploadpurging": map[any]any{"enabled": false}},
	}
	if proxy != nil {
		dc.Proxy = *proxy
	}
	ctx, cancel := context.WithCancel(hub.QuietContext(context.Background()))
	app := handlers.NewApp(ctx, dc)
	srv := httptest.NewUnstartedServer(app)
	srv.Config.BaseContext = func(net.Listener) context.Context { return ctx }
	srv.Start()
	b.Cleanup(func() {
		srv.CloseClientConnections()
		srv.Close()
		_ = app.Shutdown()
		cancel()
	})
	return srv.URL
}

// writeHosts points containerd's docker.io at mirror, with a dead port as
// the fallback server so nothing else can answer.
func writeHosts(b *testing.B, certsDir, mirror string) {
	b.Helper()
	dir := filepath.Join(certsDir, "docker.io")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		b.Fatal(err)
	}
	hosts := fmt.Sprintf("server = \"http://127.0.0.1:1\"\n\n[host.%q]\n  capabilities = [\"pull\", \"resolve\"]\n", mirror)
	if err := os.WriteFile(filepath.Join(dir, "hosts.toml"), []byte(hosts), 0o644); err != nil {
		b.Fatal(err)
	}
}

// BenchmarkCtrPull times a cold `ctr images pull` (with unpack) of one image
// (3 layers of 16 MiB; SHOAL_BENCH_PULL_LAYER_MIB) by containerd C, in
// interleaved rounds: through C's own shoal node, which finds the image on
// peer node A (an OCI layout), against directly from a plain distribution
// registry that holds the same image, and against directly from the tests'
// Docker-Hub-like stand-in (test/hub: token auth, rate-limit headers). Before
// each pull the image and its content are deleted, so every pull is cold.
// Target: peer no slower.
func BenchmarkCtrPull(b *testing.B) {
	if !onlyOnce(b) {
		return
	}
	bin := requireShoal(b)
	ctrd := harness.StartContainerd(b, harness.ContainerdV2)
	const ref = "docker.io/library/benchpull:v1"
	img := harness.RandomImage(b, 3, int64(envInt("SHOAL_BENCH_PULL_LAYER_MIB", 16))<<20)
	var total int64
	if ls, err := img.Layers(); err == nil {
		for _, l := range ls {
			sz, _ := l.Size()
			total += sz
		}
	}

	layoutDir := b.TempDir()
	harness.WriteOCILayoutDir(b, layoutDir, img, ref)
	a := harness.StartShoalNode(b, harness.NodeOptions{Bin: bin, Name: "A", LayoutDir: layoutDir, Args: []string{"--log-level", "info"}})
	c := harness.StartShoalNode(b, harness.NodeOptions{Bin: bin, Name: "C", Containerd: ctrd, BootstrapPeers: []string{a.RouterAddr}, Args: []string{"--log-level", "info"}})

	reg := startRegistry(b)
	dst, err := name.ParseReference(strings.TrimPrefix(reg, "http://")+"/library/benchpull:v1", name.Insecure)
	if err != nil {
		b.Fatal(err)
	}
	if err := remote.Write(dst, img); err != nil {
		b.Fatalf("push to the registry stand-in: %v", err)
	}

	// The Docker-Hub-like stand-in of the tests: a distribution registry
	// behind token auth and rate-limit headers (anonymous, unlimited).
	h := hub.Start(b, hub.WithAnonymousLimit(hub.Unlimited))
	h.Push(b, "library/benchpull", "v1", img)

	cold := func() {
		_, _ = ctrd.CtrErr("images", "rm", "--sync", ref)
		out := ctrd.Ctr(b, "content", "ls", "-q")
		if strings.TrimSpace(out) != "" {
			for _, d := range strings.Fields(out) {
				_, _ = ctrd.CtrErr("content", "rm", d)
			}
		}
		if out := strings.TrimSpace(ctrd.Ctr(b, "content", "ls", "-q")); out != "" {
			b.Fatalf("content left before a cold pull:\n%s", out)
		}
	}
	timed := func(mirror string) func() (float64, error) {
		return func() (float64, error) {
			cold()
			writeHosts(b, ctrd.CertsDir, mirror)
			start := time.Now()
			out, err := ctrd.CtrErr("images", "pull", "--hosts-dir", ctrd.CertsDir, ref)
			if err != nil {
				return 0, fmt.Errorf("pull via %s: %w\n%s", mirror, err, out)
			}
			return time.Since(start).Seconds(), nil
		}
	}
	// Wait until C finds the image on A, then warm both paths once.
	waitFor(b, 30*time.Second, "C resolves the tag through A", func() error {
		st, err := head(newClient(), c.URL()+"/v2/library/benchpull/manifests/v1?ns=docker.io")
		if err != nil {
			return err
		}
		if st != 200 {
			return fmt.Errorf("HEAD tag on C: %d", st)
		}
		return nil
	})
	for _, m := range []string{c.URL(), reg, h.URL()} {
		if _, err := timed(m)(); err != nil {
			b.Fatal(err)
		}
	}
	peerBefore := c.Metric(b, "shoal_node_served_bytes_total", `source="peer"`)
	logf("BenchmarkCtrPull: %.0f MiB of layers, %d rounds, seconds (lower is better)", float64(total)/(1<<20), rounds())
	meds := sideBySide(b, rounds(), "s",
		contender{"via-peer", timed(c.URL())},
		contender{"direct", timed(reg)},
		contender{"direct-hub", timed(h.URL())},
	)
	if got := c.Metric(b, "shoal_node_served_bytes_total", `source="peer"`) - peerBefore; got < float64(total)*float64(rounds()) {
		b.Fatalf("node C served %v bytes from peers over %d pulls of %d bytes of layers: the pulls did not go through the peer", got, rounds(), total)
	}
	ratio := meds[0] / meds[1]
	result(b, "node/ctr-pull-peer-vs-direct", fmt.Sprintf("via-peer=%.3fs direct=%.3fs", meds[0], meds[1]), ratio, "<= 1.0 (peer time / direct time)", ratio <= 1.0)
	hr := meds[0] / meds[2]
	result(b, "node/ctr-pull-peer-vs-hub", fmt.Sprintf("via-peer=%.3fs direct-from-hub-stand-in=%.3fs", meds[0], meds[2]), hr, "<= 1.0 (peer time / Docker-Hub-like stand-in time, token auth)", hr <= 1.0)
}
