package cache_e2e

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/shoal-oci/shoal/test/harness"
	"github.com/shoal-oci/shoal/test/hub"
)

// readyz returns the status of a replica's /readyz.
func readyz(c *cacheProc) (int, error) {
	resp, _, err := doErr(http.MethodGet, "http://"+c.metricsAddr+"/readyz")
	if err != nil {
		return 0, err
	}
	return resp.StatusCode, nil
}

// startSharedReplicas starts two cache replicas on one storage directory
// and the Redis at redisURL.
func startSharedReplicas(t *testing.T, h *hub.Hub, redisURL string) (r1, r2 *cacheProc) {
	r1, r2, _ = startSharedReplicasIn(t, h, redisURL)
	return r1, r2
}

// startSharedReplicasIn is startSharedReplicas that also returns the
// storage directory.
func startSharedReplicasIn(t *testing.T, h *hub.Hub, redisURL string) (r1, r2 *cacheProc, shared string) {
	t.Helper()
	shared = filepath.Join(t.TempDir(), "registry")
	args := []string{"--storage-opt", "rootdirectory=" + shared, "--redis-url", redisURL}
	return startCache(t, h, cacheOpts{name: "r1", args: args}), startCache(t, h, cacheOpts{name: "r2", args: args}), shared
}

// waitStored waits until every blob of want (but the manifest md) is
// committed in the filesystem storage at root.
func waitStored(t *testing.T, root string, want content, md digest.Digest) {
	t.Helper()
	eventually(t, 30*time.Second, "blobs committed to storage", func() error {
		for d := range want {
			if d == md {
				continue
			}
			p := filepath.Join(root, "docker/registry/v2/blobs", d.Algorithm().String(), d.Encoded()[:2], d.Encoded(), "data")
			if _, err := os.Stat(p); err != nil {
				return err
			}
		}
		return nil
	})
}

// waitRedisUp waits until c reports Redis reachable (up) or not, as
// shoal_dependency_up says; what names the wait.
func waitRedisUp(t *testing.T, c *cacheProc, up bool, timeout time.Duration, what string) {
	t.Helper()
	want := 0.0
	if up {
		want = 1
	}
	eventually(t, timeout, c.name+" "+what, func() error {
		if v := c.metric(t, "shoal_dependency_up", `dependency="redis"`); v != want {
			return fmt.Errorf("shoal_dependency_up = %v", v)
		}
		return nil
	})
}

// TestRedisFaults_ReplicasStayReadyAndServe: two replicas share storage and a
// Redis. Redis is killed, or stopped (SIGSTOP: connections hang). Both
// replicas stay ready, say they run degraded (log line and metric), and keep
// serving cached and cold content, each blob fetched upstream once. When
// Redis comes back they say so and share state again.
func TestRedisFaults_ReplicasStayReadyAndServe(t *testing.T) {
	for _, fault := range []string{"kill", "sigstop"} {
		t.Run(fault, func(t *testing.T) {
			h := hub.Start(t)
			rd := harness.StartRedisServer(t)
			r1, r2, shared := startSharedReplicasIn(t, h, rd.URL)

			warm := harness.RandomImage(t, 2, 64<<10)
			h.Push(t, "library/warm", "v1", warm)
			pullAll(t, r1, h, "library/warm", "v1", imageContent(t, warm))

			switch fault {
			case "kill":
				rd.Kill()
			case "sigstop":
				rd.Pause()
				t.Cleanup(rd.Resume)
			}
			for _, c := range []*cacheProc{r1, r2} {
				waitRedisUp(t, c, false, 15*time.Second, "reports redis degraded")
				if st, err := readyz(c); err != nil || st != http.StatusOK {
					t.Fatalf("%s /readyz with redis %s: %d %v; want 200 (it can serve)", c.name, fault, st, err)
				}
				if v := c.metric(t, "shoal_dependency_transitions_total", `dependency="redis"`, `to="degraded"`); v < 1 {
					t.Errorf("%s: degraded transitions = %v, want >= 1", c.name, v)
				}
				if !strings.Contains(c.log(), "running degraded") {
					t.Errorf("%s: no log line says it runs degraded", c.name)
				}
			}

			// Cached content from both; a cold image through r1 then r2.
			before := h.Counts()
			pullAll(t, r2, h, "library/warm", "v1", imageContent(t, warm))
			cold := harness.RandomImage(t, 2, 256<<10)
			coldMD := h.Push(t, "library/cold", "v1", cold)
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			for _, c := range []*cacheProc{r1, r2} {
				got, err := ggcrPull(ctx, c.addr, "library/cold", "v1", h.Host())
				if err != nil {
					t.Fatalf("cold pull through %s with redis %s: %v", c.name, fault, err)
				}
				if err := imageContent(t, cold).same(got); err != nil {
					t.Fatalf("cold pull through %s: %v", c.name, err)
				}
				// With Redis down no lease tells r2 that r1 is committing:
				// it finds the blobs once they are in the shared storage.
				waitStored(t, shared, imageContent(t, cold), coldMD)
			}
			after := h.Counts()
			if d := after.BlobGET - before.BlobGET; d != 3 { // config + 2 layers, once each
				t.Errorf("upstream blob GETs while degraded = %d, want 3", d)
			}
			if d := after.ManifestGET - before.ManifestGET; d != 1 {
				t.Errorf("counted manifest GETs while degraded = %d, want 1", d)
			}

			switch fault {
			case "kill":
				rd.Restart(t)
			case "sigstop":
				rd.Resume()
			}
			for _, c := range []*cacheProc{r1, r2} {
				waitRedisUp(t, c, true, 15*time.Second, "reports redis recovered")
				if v := c.metric(t, "shoal_dependency_transitions_total", `dependency="redis"`, `to="recovered"`); v < 1 {
					t.Errorf("%s: recovered transitions = %v, want >= 1", c.name, v)
				}
			}
			pullAll(t, r2, h, "library/cold", "v1", imageContent(t, cold))
		})
	}
}

// TestUpstreamChunkedBlob_NoPanicNoRetry: an upstream that sends every blob
// chunked (no Content-Length) is pulled by crane through a real cache
// process on the first try: no panic, each blob fetched once.
func TestUpstreamChunkedBlob_NoPanicNoRetry(t *testing.T) {
	h := hub.Start(t)
	h.SetChunkedBlobs(true)
	c := startCache(t, h, cacheOpts{name: "c", upstreams: []string{"docker.io=" + h.URL()}})
	img := harness.RandomImage(t, 2, 512<<10)
	h.Push(t, "library/app", "v1", img)
	want := imageContent(t, img)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if err := cliPull(t, ctx, "crane", c.addr, "library/app", "v1", want); err != nil {
		t.Fatalf("crane pull of chunked upstream blobs: %v", err)
	}
	if n := h.Counts().BlobGET; n != 3 {
		t.Errorf("upstream blob GETs = %d, want 3 (config + 2 layers, no retries)", n)
	}
	if v := c.metric(t, "shoal_panics_total"); v != 0 {
		t.Errorf("shoal_panics_total = %v, want 0", v)
	}
	if strings.Contains(c.log(), "panic") {
		t.Errorf("the cache log mentions a panic:\n%s", c.log())
	}
}

// TestCacheKilledMidFetch_RestartCleansSpoolAndServes: a cache SIGKILLed
// while it spools a blob leaves a spool file; the restarted process removes
// it, and the next pull completes byte-identical.
func TestCacheKilledMidFetch_RestartCleansSpoolAndServes(t *testing.T) {
	h := hub.Start(t)
	img := harness.RandomImage(t, 1, 2<<20)
	h.Push(t, "library/app", "v1", img)
	want := imageContent(t, img)
	layers, _ := img.Layers()
	lh, _ := layers[0].Digest()
	c := startCache(t, h, cacheOpts{name: "c1"})
	spool := filepath.Join(c.dataDir, "spool")
	h.SetBandwidth(64 << 10) // ~30s for the layer: the kill comes first
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() { _, _ = ggcrPull(ctx, c.addr, "library/app", "v1", h.Host()) }()
	eventually(t, 20*time.Second, "a spool file for the layer", func() error {
		if h.BlobGETs(hub.DigestOf(lh)) < 1 {
			return fmt.Errorf("layer not requested upstream yet")
		}
		left, _ := filepath.Glob(filepath.Join(spool, "flight-*"))
		if len(left) == 0 {
			return fmt.Errorf("no spool file")
		}
		return nil
	})
	c.kill()
	cancel()
	if left, _ := filepath.Glob(filepath.Join(spool, "flight-*")); len(left) == 0 {
		t.Fatal("the killed process left no spool file: the test proves nothing")
	}
	h.SetBandwidth(0)
	c2 := startCache(t, h, cacheOpts{name: "c2", dataDir: c.dataDir})
	if left, _ := filepath.Glob(filepath.Join(spool, "flight-*")); len(left) != 0 {
		t.Fatalf("spool files left after restart: %v", left)
	}
	pullAll(t, c2, h, "library/app", "v1", want)
}
