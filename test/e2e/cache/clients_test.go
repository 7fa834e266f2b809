package cache_e2e

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/opencontainers/go-digest"

	"github.com/shoal-oci/shoal/test/harness"
)

// content maps each digest of an image (manifest, config, layers) to its bytes.
type content map[digest.Digest][]byte

// imageContent returns every digest of img with its bytes.
func imageContent(t *testing.T, img v1.Image) content {
	t.Helper()
	c, err := readImage(img)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func readImage(img v1.Image) (content, error) {
	c := content{}
	raw, err := img.RawManifest()
	if err != nil {
		return nil, fmt.Errorf("manifest: %w", err)
	}
	c[digest.FromBytes(raw)] = raw
	cfg, err := img.RawConfigFile()
	if err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	c[digest.FromBytes(cfg)] = cfg
	layers, err := img.Layers()
	if err != nil {
		return nil, fmt.Errorf("layers: %w", err)
	}
	for _, l := range layers {
		rc, err := l.Compressed()
		if err != nil {
			return nil, fmt.Errorf("layer: %w", err)
		}
		b, err := io.ReadAll(rc)
		rc.Close()
		if err != nil {
			return nil, fmt.Errorf("read layer: %w", err)
		}
		c[digest.FromBytes(b)] = b
	}
	return c, nil
}

// same reports how got differs from want, or nil when every digest of want
// is in got with identical bytes.
func (want content) same(got content) error {
	if len(got) != len(want) {
		return fmt.Errorf("got %d digests, want %d", len(got), len(want))
	}
	for d, b := range want {
		if !bytes.Equal(got[d], b) {
			return fmt.Errorf("%s: got %d bytes that differ from the source's %d", d, len(got[d]), len(b))
		}
	}
	return nil
}

// nsTransport adds ?ns= to every request, as containerd does for a mirror.
type nsTransport struct {
	ns   string
	next http.RoundTripper
}

func (n nsTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	r = r.Clone(r.Context())
	q := r.URL.Query()
	q.Set("ns", n.ns)
	r.URL.RawQuery = q.Encode()
	return n.next.RoundTrip(r)
}

// ggcrPull pulls addr/repo:tag with go-containerregistry (adding ?ns= when ns
// is set) and returns everything it read.
func ggcrPull(ctx context.Context, addr, repo, tag, ns string) (content, error) {
	return ggcrPullVia(ctx, http.DefaultTransport.(*http.Transport).Clone(), addr, repo, tag, ns)
}

// ggcrPullVia is ggcrPull over the transport tr.
func ggcrPullVia(ctx context.Context, tr http.RoundTripper, addr, repo, tag, ns string) (content, error) {
	ref, err := name.NewTag(addr+"/"+repo+":"+tag, name.Insecure)
	if err != nil {
		return nil, err
	}
	if ns != "" {
		tr = nsTransport{ns: ns, next: tr}
	}
	img, err := remote.Image(ref, remote.WithContext(ctx), remote.WithTransport(tr))
	if err != nil {
		return nil, fmt.Errorf("ggcr pull %s: %w", ref, err)
	}
	return readImage(img)
}

// recorder is a transport that keeps a copy of every response's status
// line, headers and body, for tests that grep what a client saw.
type recorder struct {
	next http.RoundTripper
	mu   sync.Mutex
	buf  bytes.Buffer
}

func (r *recorder) RoundTrip(req *http.Request) (*http.Response, error) {
	resp, err := r.next.RoundTrip(req)
	if err != nil {
		return nil, err
	}
	body, rerr := io.ReadAll(resp.Body)
	resp.Body.Close()
	r.mu.Lock()
	fmt.Fprintf(&r.buf, "%s %s -> %s\n", req.Method, req.URL, resp.Status)
	_ = resp.Header.Write(&r.buf)
	r.buf.Write(body)
	r.buf.WriteString("\n")
	r.mu.Unlock()
	resp.Body = io.NopCloser(bytes.NewReader(body))
	if rerr != nil {
		return nil, rerr
	}
	return resp, nil
}

func (r *recorder) String() string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.buf.String()
}

// layoutContent reads want's digests from an OCI layout directory.
func layoutContent(dir string, want content) content {
	got := content{}
	for d := range want {
		if b, err := os.ReadFile(filepath.Join(dir, "blobs", d.Algorithm().String(), d.Encoded())); err == nil {
			got[d] = b
		}
	}
	return got
}

// cliPull pulls addr/repo:tag (no ns: the cache's docker.io) into an OCI
// layout with a real client: "crane", "regctl" or "oras".
func cliPull(t *testing.T, ctx context.Context, tool, addr, repo, tag string, want content) error {
	dir := t.TempDir()
	out := filepath.Join(dir, "layout")
	ref := addr + "/" + repo + ":" + tag
	var cmd *exec.Cmd
	switch tool {
	case "crane":
		cmd = exec.CommandContext(ctx, harness.Binary(t, "SHOAL_CRANE_BIN", "crane"), "pull", "--insecure", "--format", "oci", ref, out)
	case "regctl":
		cmd = exec.CommandContext(ctx, harness.Binary(t, "SHOAL_REGCTL_BIN", "regctl"),
			"--host", "reg="+addr+",tls=disabled", "image", "copy", ref, "ocidir://"+out+":"+tag)
	case "oras":
		cmd = exec.CommandContext(ctx, harness.Binary(t, "SHOAL_ORAS_BIN", "oras"),
			"copy", "--from-plain-http", ref, "--to-oci-layout", out+":"+tag)
	default:
		return fmt.Errorf("unknown client %s", tool)
	}
	cmd.Env = append(harness.FilteredEnv("SHOAL_"), "HOME="+dir, "DOCKER_CONFIG="+filepath.Join(dir, "docker"))
	cmd.WaitDelay = 5 * time.Second
	b, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s: %w\n%s", strings.Join(cmd.Args, " "), err, b)
	}
	if err := want.same(layoutContent(out, want)); err != nil {
		return fmt.Errorf("%s: %w", tool, err)
	}
	return nil
}
