package cache_e2e

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/shoal-oci/shoal/test/harness"
	"github.com/shoal-oci/shoal/test/hub"
)

// site is one simulated node: a containerd and the shoal node beside it.
type site struct {
	name string
	ctrd *harness.Containerd
	node *harness.ShoalNode
}

// writeHostsTOML points containerd's pulls of registry at the node, with a
// dead port as the last-resort server so nothing can bypass shoal.
// containerd looks for "host_port_" first, then "host:port".
func writeHostsTOML(t *testing.T, c *harness.Containerd, registry, nodeURL string) {
	t.Helper()
	dir := filepath.Join(c.CertsDir, registry)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	toml := fmt.Sprintf("server = \"http://127.0.0.1:1\"\n\n[host.%q]\n  capabilities = [\"pull\", \"resolve\"]\n", nodeURL)
	if err := os.WriteFile(filepath.Join(dir, "hosts.toml"), []byte(toml), 0o644); err != nil {
		t.Fatal(err)
	}
}

// requireContainerdContent checks that every digest of want is in the
// site's content store with identical bytes.
func requireContainerdContent(t *testing.T, s *site, want content) {
	t.Helper()
	for d, b := range want {
		got, err := os.ReadFile(filepath.Join(s.ctrd.Root, "io.containerd.content.v1.content", "blobs", d.Algorithm().String(), d.Encoded()))
		if err != nil {
			t.Fatalf("%s: %s missing from containerd: %v", s.name, d, err)
		}
		if string(got) != string(b) {
			t.Fatalf("%s: %s differs from the source", s.name, d)
		}
	}
}

// TestNodeToCacheEndToEnd: three nodes (each with its own containerd), one
// cache and the hub. The first pull on node A goes upstream once; the same
// image on node B comes from A, and upstream sees no further counted request
// and no blob GET.
func TestNodeToCacheEndToEnd(t *testing.T) {
	harness.RequireRoot(t)
	bin := requireShoal(t)
	h := hub.Start(t)
	img := harness.RandomImage(t, 2, 256<<10)
	md := h.Push(t, "library/app", "v1", img)
	want := imageContent(t, img)
	c := startCache(t, h, cacheOpts{})

	sites := startSites(t, bin, h, []*cacheProc{c}, 3)
	a, b := sites[0], sites[1]
	ref := h.Host() + "/library/app:v1"
	h.ResetCounts()

	if out, err := a.ctrd.CtrErr("images", "pull", "--hosts-dir", a.ctrd.CertsDir, ref); err != nil {
		t.Fatalf("pull on A: %v\n%s", err, out)
	}
	requireContainerdContent(t, a, want)
	afterA := h.Counts()
	if afterA.ManifestGET != 1 {
		t.Fatalf("first pull: %d counted manifest GETs, want 1 (%+v)", afterA.ManifestGET, afterA)
	}
	for d := range want {
		if d != md && h.BlobGETs(d) != 1 {
			t.Fatalf("first pull: blob %s fetched upstream %d times, want 1", d, h.BlobGETs(d))
		}
	}
	if n := c.metric(t, "shoal_cache_requests_total", `result="miss"`); n < 1 {
		t.Fatalf("the cache tier saw no miss: the pull did not go through it")
	}

	// A advertises what its containerd now holds.
	eventually(t, 15*time.Second, "A advertises the image", func() error {
		v, err := a.node.MetricErr("shoal_node_advertised_keys")
		if err != nil {
			return err
		}
		if v < float64(len(want)) {
			return fmt.Errorf("A advertises %v keys, want >= %d", v, len(want))
		}
		return nil
	})
	peerBytesA := a.node.Metric(t, "shoal_node_served_bytes_total", `source="local"`)

	if out, err := b.ctrd.CtrErr("images", "pull", "--hosts-dir", b.ctrd.CertsDir, ref); err != nil {
		t.Fatalf("pull on B: %v\n%s", err, out)
	}
	requireContainerdContent(t, b, want)
	afterB := h.Counts()
	// Within the freshness window the tag resolves from the cache: not even a free HEAD.
	if afterB.ManifestGET != afterA.ManifestGET || afterB.BlobGET != afterA.BlobGET || afterB.Throttled != afterA.Throttled ||
		afterB.ManifestHEAD != afterA.ManifestHEAD {
		t.Fatalf("the second pull reached upstream: %+v -> %+v", afterA, afterB)
	}
	fromPeer := b.node.Metric(t, "shoal_node_requests_total", `source="peer"`)
	servedByA := a.node.Metric(t, "shoal_node_served_bytes_total", `source="local"`) - peerBytesA
	if fromPeer < 1 || servedByA <= 0 {
		t.Fatalf("B did not pull from A: B peer requests %v, A served %v more local bytes", fromPeer, servedByA)
	}
	var layerBytes int
	for d, bts := range want {
		if d != md {
			layerBytes += len(bts)
		}
	}
	if servedByA < float64(layerBytes)*0.9 {
		t.Fatalf("A served %v bytes of %d blob bytes: B's pull did not come from its peer", servedByA, layerBytes)
	}
	t.Logf("hub after A %+v, after B %+v; B peer requests %v, A served %v bytes, B cache requests %v",
		afterA, afterB, fromPeer, servedByA, b.node.Metric(t, "shoal_node_requests_total", `source="cache"`))
	_ = digest.Canonical
}
