package cache_e2e

import (
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/shoal-oci/shoal/test/harness"
	"github.com/shoal-oci/shoal/test/hub"
)

// startSites starts n sites (containerd and shoal node) behind the caches,
// site i behind caches[i%len(caches)], meshed, with hosts.toml pointing the
// hub's registry at each node.
func startSites(t *testing.T, bin string, h *hub.Hub, caches []*cacheProc, n int) []*site {
	t.Helper()
	var sites []*site
	var routers []string
	for i := range n {
		name := fmt.Sprintf("n%d", i)
		ctrd := harness.StartContainerd(t, harness.ContainerdV2)
		node := harness.StartShoalNode(t, harness.NodeOptions{
			Bin: bin, Name: name, Containerd: ctrd, BootstrapPeers: routers,
			Registries: []string{h.Host()}, Args: []string{"--cache-url", caches[i%len(caches)].url()},
		})
		if len(routers) < 2 {
			routers = append(routers, node.RouterAddr)
		}
		writeHostsTOML(t, ctrd, h.Host(), node.URL())
		sites = append(sites, &site{name: name, ctrd: ctrd, node: node})
	}
	eventually(t, 30*time.Second, "DHT mesh", func() error {
		for _, s := range sites {
			v, err := s.node.MetricErr("shoal_dht_peers")
			if err != nil {
				return err
			}
			if v < float64(n-1) {
				return fmt.Errorf("node %s has %v peers, want %d", s.name, v, n-1)
			}
		}
		return nil
	})
	return sites
}

// startHerd pushes a one-layer 24 MiB image to a fresh hub serving at
// bandwidth bytes a second, and starts a cache tier (with cacheArgs) and
// six sites behind it.
func startHerd(t *testing.T, bandwidth int64, cacheArgs ...string) (*hub.Hub, *cacheProc, []*site, content, digest.Digest) {
	t.Helper()
	h, caches, sites, want, md := startHerdOn(t, bandwidth, 1, cacheArgs...)
	return h, caches[0], sites, want, md
}

// startHerdOn is startHerd with the given number of cache replicas: more
// than one share filesystem storage and a Redis, and the sites alternate
// between them.
func startHerdOn(t *testing.T, bandwidth int64, replicas int, cacheArgs ...string) (*hub.Hub, []*cacheProc, []*site, content, digest.Digest) {
	t.Helper()
	bin := requireShoal(t)
	h := hub.Start(t)
	img := harness.RandomImage(t, 1, 24<<20)
	md := h.Push(t, "library/herd", "v1", img)
	want := imageContent(t, img)
	if replicas > 1 {
		st := fsStorage(t)
		rd := harness.StartRedisServer(t)
		cacheArgs = append(append(st.args, "--redis-url", rd.URL), cacheArgs...)
	}
	var caches []*cacheProc
	for i := range replicas {
		caches = append(caches, startCache(t, h, cacheOpts{name: fmt.Sprintf("r%d", i+1), args: cacheArgs}))
	}
	sites := startSites(t, bin, h, caches, 6)
	h.SetBandwidth(bandwidth)
	h.ResetCounts()
	return h, caches, sites, want, md
}

// pullHerd pulls the herd image on every site at the same moment and
// fails t unless every pull completes with identical bytes and the hub saw
// one counted pull and each blob once. It returns the image's size without
// its manifest.
func pullHerd(t *testing.T, h *hub.Hub, sites []*site, want content, md digest.Digest) float64 {
	t.Helper()
	for _, err := range pullAtOnce(sites, h.Ref("library/herd", "v1")) {
		if err != nil {
			t.Fatal(err)
		}
	}
	for _, s := range sites {
		requireContainerdContent(t, s, want)
	}
	if got := h.Counts(); got.ManifestGET != 1 {
		t.Fatalf("hub saw %d counted manifest GETs, want 1 (%+v)", got.ManifestGET, got)
	}
	for d := range want {
		if d != md && h.BlobGETs(d) != 1 {
			t.Fatalf("blob %s fetched upstream %d times, want 1", d, h.BlobGETs(d))
		}
	}
	return layerBytes(want, md)
}

// sumCaches adds a metric over cache replicas.
func sumCaches(t *testing.T, caches []*cacheProc, name string, labels ...string) float64 {
	t.Helper()
	var sum float64
	for _, c := range caches {
		sum += c.metric(t, name, labels...)
	}
	return sum
}

// pullAtOnce pulls ref on every site at the same moment and returns each
// site's error.
func pullAtOnce(sites []*site, ref string) []error {
	errs := make([]error, len(sites))
	var wg sync.WaitGroup
	start := make(chan struct{})
	for i, s := range sites {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			if out, err := s.ctrd.CtrErr("images", "pull", "--hosts-dir", s.ctrd.CertsDir, ref); err != nil {
				errs[i] = fmt.Errorf("pull on %s: %w\n%s", s.name, err, out)
			}
		}()
	}
	close(start)
	wg.Wait()
	return errs
}

// sumNodes adds a metric over the sites' nodes.
func sumNodes(t *testing.T, sites []*site, name string, labels ...string) float64 {
	t.Helper()
	var sum float64
	for _, s := range sites {
		sum += s.node.Metric(t, name, labels...)
	}
	return sum
}

// layerBytes is the size of an image's blobs other than the manifest.
func layerBytes(want content, manifest digest.Digest) float64 {
	var n int
	for d, b := range want {
		if d != manifest {
			n += len(b)
		}
	}
	return float64(n)
}

// TestHerdScaleOut: six nodes start one image at the same moment through
// one cache tier (--herd-direct 2, two chains). The hub sees one counted
// pull and each blob once; the cache tier sends at most two copies of the
// image, not six; the other nodes get it from nodes still receiving it; every node's
// containerd holds identical bytes.
func TestHerdScaleOut(t *testing.T) {
	harness.RequireRoot(t)
	// 24 MiB at 16 MiB/s: the first nodes are still receiving when the
	// last ones ask.
	h, c, sites, want, md := startHerd(t, 16<<20, "--herd-direct", "2")
	cacheBefore := c.metric(t, "shoal_cache_served_bytes_total")

	image := pullHerd(t, h, sites, want, md)
	sent := c.metric(t, "shoal_cache_served_bytes_total") - cacheBefore
	if sent > 2*image+64<<10 {
		t.Fatalf("the cache tier sent %.0f bytes for six nodes, %.2f× the image: want at most 2×", sent, sent/image)
	}
	fromReceivers := sumNodes(t, sites, "shoal_node_served_bytes_total", `source="receiver"`)
	inflight := sumNodes(t, sites, "shoal_node_inflight_served_bytes_total")
	if fromReceivers < 3*image {
		t.Fatalf("nodes got %.0f bytes from nodes receiving the image, want at least 3 of its 4 redirected copies (%.0f)", fromReceivers, 3*image)
	}
	if inflight < image {
		t.Fatalf("nodes served %.0f bytes from transfers in progress, want at least one image (%.0f): the herd was served only after pulls completed", inflight, image)
	}
	if redirected := c.metric(t, "shoal_cache_herd_requests_total", `result="redirected"`); redirected < 4 {
		t.Fatalf("the cache tier redirected %v requests, want at least 4", redirected)
	}
	t.Logf("image %.0f bytes; cache tier sent %.2f×; from receivers %.2f×, served in flight %.2f×",
		image, sent/image, fromReceivers/image, inflight/image)
	requireNoPanicSites(t, sites)
}

// TestHerdAcrossReplicas: six nodes, alternating between two cache
// replicas on one Redis and shared storage, start one image at the same
// moment with --herd-direct 1. The herd is one, whichever replica a node
// asks: the replicas together send the image once (a replica of its own
// would send it again), the nodes asking the replica that did not serve
// are chained behind nodes the other one served, the hub sees each blob
// once, and every node holds identical bytes.
func TestHerdAcrossReplicas(t *testing.T) {
	harness.RequireRoot(t)
	h, caches, sites, want, md := startHerdOn(t, 16<<20, 2, "--herd-direct", "1")
	sentBefore := sumCaches(t, caches, "shoal_cache_served_bytes_total")

	image := pullHerd(t, h, sites, want, md)
	sent := sumCaches(t, caches, "shoal_cache_served_bytes_total") - sentBefore
	if sent > 1.5*image {
		t.Fatalf("two replicas sent %.0f bytes for six nodes, %.2f× the image: want one copy (a herd per replica sends two)", sent, sent/image)
	}
	for _, c := range caches {
		if v := c.metric(t, "shoal_cache_herd_requests_total", `result="redirected"`); v < 1 {
			t.Fatalf("replica %s redirected no request: its nodes were not chained into the shared herd", c.name)
		}
	}
	if direct := sumCaches(t, caches, "shoal_cache_herd_requests_total", `result="direct"`); direct > float64(len(want)-1) {
		t.Fatalf("the replicas served %v requests directly, want one per blob (%d)", direct, len(want)-1)
	}
	if fromReceivers := sumNodes(t, sites, "shoal_node_served_bytes_total", `source="receiver"`); fromReceivers < 4*image {
		t.Fatalf("nodes got %.0f bytes from nodes receiving the image, want at least 4 of the 5 chained copies (%.0f)", fromReceivers, 4*image)
	}
	requireNoPanicSites(t, sites)
}

// TestHerdReceiverKilled: a node that is serving the image to another node
// while it still receives it is SIGKILLed mid-herd. Every other node's pull
// completes with identical bytes, the one behind the killed node resuming
// from another source, and upstream still sees each blob once.
func TestHerdReceiverKilled(t *testing.T) {
	harness.RequireRoot(t)
	// 24 MiB at 6 MiB/s, 4 s: time to find a serving node and kill it.
	h, _, sites, want, md := startHerd(t, 6<<20)

	killed := make(chan *site, 1)
	go func() {
		defer close(killed)
		deadline := time.Now().Add(20 * time.Second)
		for time.Now().Before(deadline) {
			for _, s := range sites {
				v, err := s.node.MetricErr("shoal_node_inflight_served_bytes_total")
				// Past 1 MiB it is the layer it serves, not the config.
				if err == nil && v > 1<<20 {
					s.node.Kill()
					killed <- s
					return
				}
			}
			time.Sleep(20 * time.Millisecond) // poll interval
		}
	}()
	errs := pullAtOnce(sites, h.Ref("library/herd", "v1"))
	victim := <-killed
	if victim == nil {
		t.Fatal("no node served the image in flight within 20 s, so none could be killed mid-herd")
	}
	var rest []*site
	for i, s := range sites {
		if s == victim {
			continue // its containerd lost its mirror: its pull may fail
		}
		if errs[i] != nil {
			t.Fatalf("%v (after %s was killed)", errs[i], victim.name)
		}
		requireContainerdContent(t, s, want)
		rest = append(rest, s)
	}
	for d := range want {
		if d != md && h.BlobGETs(d) != 1 {
			t.Fatalf("blob %s fetched upstream %d times, want 1", d, h.BlobGETs(d))
		}
	}
	if resumed := sumNodes(t, rest, "shoal_node_resumed_transfers_total"); resumed < 1 {
		t.Fatalf("no node resumed a transfer after %s was killed mid-stream", victim.name)
	}
	requireNoPanicSites(t, rest)
}

func requireNoPanicSites(t *testing.T, sites []*site) {
	t.Helper()
	for _, s := range sites {
		log := s.node.Log()
		if strings.Contains(strings.ToLower(log), "panic") {
			t.Errorf("node %s logged a panic", s.name)
		}
		if strings.Contains(log, "WARNING: DATA RACE") {
			t.Errorf("node %s reported a data race", s.name)
		}
	}
}
