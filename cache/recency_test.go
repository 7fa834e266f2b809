package cache_test

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	storagedriver "github.com/distribution/distribution/v3/registry/storage/driver"
	"github.com/opencontainers/go-digest"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/redis/go-redis/v9"

	"github.com/shoal-oci/shoal/cache"
	"github.com/shoal-oci/shoal/cache/flight"
	"github.com/shoal-oci/shoal/cache/recency"
	"github.com/shoal-oci/shoal/test/harness"
	"github.com/shoal-oci/shoal/test/hub"
	"github.com/shoal-oci/shoal/upstream"
	"github.com/shoal-oci/shoal/upstream/budget"
)

// redisClient is a client of a fresh private Redis.
func redisClient(t *testing.T) *redis.Client {
	t.Helper()
	return harness.RedisClient(t, harness.StartRedis(t))
}

// replica is one cache replica of a test on shared storage and Redis.
type replica struct {
	c   *cache.Cache
	srv *httptest.Server
	rs  *recency.Redis
	reg *prometheus.Registry
	// handlers counts requests in progress (see fixture.handlers).
	handlers *sync.WaitGroup
}

// startSharedReplica starts a replica in front of h on drv, sharing
// eviction state in rdb, with the size bound max and the clock clk.
func startSharedReplica(t *testing.T, h *hub.Hub, rdb redis.UniversalClient, drv storagedriver.StorageDriver, clk *clock, max int64) replica {
	t.Helper()
	ctx := context.Background()
	up, err := upstream.New(upstream.Config{Registries: map[string]upstream.Registry{
		h.Host(): {Host: h.Host(), Endpoint: h.URL(), Insecure: true},
	}})
	if err != nil {
		t.Fatal(err)
	}
	fl, err := flight.NewLocal(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		dctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		_ = fl.Drain(dctx)
	})
	rs := recency.NewRedis(rdb, "t:evict:", nil, nil)
	reg := prometheus.NewRegistry()
	c, err := cache.New(ctx, cache.Config{Driver: drv, Upstream: up, Flight: fl, Budget: budget.New(budget.NewMemoryState()),
		Registries: []string{h.Host()}, MaxSize: max, EvictInterval: time.Hour, EvictShare: rs, Now: clk.now, Registerer: reg})
	if err != nil {
		t.Fatal(err)
	}
	srv, handlers := countingServer(t, c)
	return replica{c: c, srv: srv, rs: rs, reg: reg, handlers: handlers}
}

// TestEvictionSharesRecencyAcrossReplicas: two replicas on one storage and
// one Redis. What replica A serves counts as recent for replica B's
// eviction pass, so B evicts the blob nobody used, not the one A is
// serving; and while A holds the eviction lock, B's pass does nothing.
func TestEvictionSharesRecencyAcrossReplicas(t *testing.T) {
	h := hub.Start(t)
	rdb := redisClient(t)
	ctx := context.Background()
	storageDir := t.TempDir()
	clk := &clock{t: time.Now()}
	x, y := harness.RandomLayer(t, 20_000), harness.RandomLayer(t, 20_000)
	h.Push(t, "library/loose", "v1", harness.ImageWithLayers(t, x, y))
	dx, nx := layerDigest(t, x)
	dy, ny := layerDigest(t, y)

	drv, err := cache.NewDriver(ctx, "filesystem", map[string]any{"rootdirectory": storageDir})
	if err != nil {
		t.Fatal(err)
	}
	start := func() replica { return startSharedReplica(t, h, rdb, drv, clk, nx+ny-1) }
	a, b := start(), start()
	getBlob := func(r replica, d string) {
		t.Helper()
		resp, err := http.Get(r.srv.URL + "/v2/library/loose/blobs/" + d + "?ns=" + h.Host())
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != 200 {
			t.Fatalf("GET %s: %d", d, resp.StatusCode)
		}
		// The use is recorded (in the handler, after the last byte) before
		// the clock moves on.
		r.handlers.Wait()
	}
	stored := func(c *cache.Cache, d string) bool {
		t.Helper()
		ok, err := cache.HasBlobForTest(ctx, c, digest.Digest(d))
		if err != nil {
			t.Fatal(err)
		}
		return ok
	}
	getBlob(a, dx.String())
	getBlob(a, dy.String())
	harness.Eventually(t, 5*time.Second, "both blobs committed", func() error {
		if !stored(b.c, dx.String()) || !stored(b.c, dy.String()) {
			return errors.New("not yet")
		}
		return nil
	})
	// And recorded as stored, at this clock time: a commit's record (its
	// touch and inventory entry) may land after the blob is visible.
	dctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if err := cache.DrainForTest(dctx, a.c); err != nil {
		t.Fatal(err)
	}

	// Ten minutes on, A serves x again; three more, and B runs a pass.
	clk.add(10 * time.Minute)
	getBlob(a, dx.String())
	if err := a.rs.Flush(ctx); err != nil { // Run does this every second
		t.Fatal(err)
	}
	clk.add(3 * time.Minute)

	unlock, ok, err := a.rs.TryLock(ctx, time.Minute)
	if err != nil || !ok {
		t.Fatalf("A takes the eviction lock: %v %v", ok, err)
	}
	if err := b.c.Evict(ctx); err != nil {
		t.Fatal(err)
	}
	if !stored(b.c, dx.String()) || !stored(b.c, dy.String()) {
		t.Fatal("B evicted while A held the eviction lock")
	}
	unlock()

	if err := b.c.Evict(ctx); err != nil {
		t.Fatal(err)
	}
	if !stored(b.c, dx.String()) {
		t.Fatal("B evicted the blob A served three minutes ago")
	}
	if stored(b.c, dy.String()) {
		t.Fatal("B kept the blob nobody used, over the size bound")
	}
}

// listingDriver counts the calls that list the storage.
type listingDriver struct {
	storagedriver.StorageDriver
	lists atomic.Int64
}

func (d *listingDriver) List(ctx context.Context, path string) ([]string, error) {
	d.lists.Add(1)
	return d.StorageDriver.List(ctx, path)
}

func (d *listingDriver) Walk(ctx context.Context, path string, f storagedriver.WalkFn, opts ...func(*storagedriver.WalkOptions)) error {
	d.lists.Add(1)
	return d.StorageDriver.Walk(ctx, path, f, opts...)
}

// gathered is the value of the metric name in reg (0 when absent).
func gathered(t *testing.T, reg *prometheus.Registry, name string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == name && len(mf.GetMetric()) > 0 {
			m := mf.GetMetric()[0]
			if m.GetCounter() != nil {
				return m.GetCounter().GetValue()
			}
			return m.GetGauge().GetValue()
		}
	}
	return 0
}

// TestEvictionPassReadsTheSharedInventory: two replicas on one storage and
// one Redis. The first pass lists the storage once and builds the shared
// inventory; later passes list nothing. When replica B stores a blob that
// takes the cache over its bound, replica A's pass evicts the least recently
// used unreferenced blob, one A never stored itself, from the inventory
// alone, and keeps the blobs a cached manifest references.
func TestEvictionPassReadsTheSharedInventory(t *testing.T) {
	h := hub.Start(t)
	rdb := redisClient(t)
	ctx := context.Background()
	clk := &clock{t: time.Now()}
	p, q := harness.RandomLayer(t, 20_000), harness.RandomLayer(t, 20_000)
	x, y := harness.RandomLayer(t, 20_000), harness.RandomLayer(t, 20_000)
	h.Push(t, "library/app", "v1", harness.ImageWithLayers(t, p, q))
	h.Push(t, "library/loose", "v1", harness.ImageWithLayers(t, x, y))
	dp, np := layerDigest(t, p)
	dq, nq := layerDigest(t, q)
	dx, nx := layerDigest(t, x)
	dy, _ := layerDigest(t, y)
	fs, err := cache.NewDriver(ctx, "filesystem", map[string]any{"rootdirectory": t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	drv := &listingDriver{StorageDriver: fs}
	max := np + nq + nx + 10_000 // p, q and x fit; one more blob does not
	a := startSharedReplica(t, h, rdb, drv, clk, max)
	b := startSharedReplica(t, h, rdb, drv, clk, max)
	get := func(r replica, path string) {
		t.Helper()
		resp, err := http.Get(r.srv.URL + path + "?ns=" + h.Host())
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != 200 {
			t.Fatalf("GET %s: %d", path, resp.StatusCode)
		}
	}
	stored := func(d digest.Digest) bool {
		t.Helper()
		ok, err := cache.HasBlobForTest(ctx, a.c, d)
		if err != nil {
			t.Fatal(err)
		}
		return ok
	}
	waitStored := func(ds ...digest.Digest) {
		t.Helper()
		harness.Eventually(t, 5*time.Second, "blobs committed", func() error {
			for _, d := range ds {
				if !stored(d) {
					return errors.New(d.String() + " not yet")
				}
			}
			return nil
		})
	}
	get(a, "/v2/library/app/manifests/v1")
	get(a, "/v2/library/app/blobs/"+dp.String())
	get(a, "/v2/library/app/blobs/"+dq.String())
	get(a, "/v2/library/loose/blobs/"+dx.String())
	waitStored(dp, dq, dx)
	if err := a.rs.Flush(ctx); err != nil { // Run does this every second
		t.Fatal(err)
	}

	// B's first pass builds the inventory with one walk.
	if err := b.c.Evict(ctx); err != nil {
		t.Fatal(err)
	}
	if drv.lists.Load() == 0 || gathered(t, b.reg, "shoal_cache_evict_walks_total") != 1 {
		t.Fatalf("first pass: %d listings, %v walks; want a walk that builds the inventory", drv.lists.Load(), gathered(t, b.reg, "shoal_cache_evict_walks_total"))
	}
	if got, want := gathered(t, b.reg, "shoal_cache_storage_bytes"), float64(np+nq+nx); got < want {
		t.Fatalf("storage after the walk = %v, want at least %v", got, want)
	}

	// Under the bound, a pass lists nothing.
	drv.lists.Store(0)
	if err := a.c.Evict(ctx); err != nil {
		t.Fatal(err)
	}
	if n := drv.lists.Load(); n != 0 {
		t.Fatalf("a pass under the bound listed the storage %d times, want 0", n)
	}

	// Ten minutes on, B stores y: over the bound. Three more, A's pass.
	clk.add(10 * time.Minute)
	get(b, "/v2/library/loose/blobs/"+dy.String())
	waitStored(dy)
	if err := b.rs.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	clk.add(3 * time.Minute)
	if err := a.c.Evict(ctx); err != nil {
		t.Fatal(err)
	}
	if n := drv.lists.Load(); n != 0 {
		t.Fatalf("an evicting pass listed the storage %d times, want 0 (it reads the inventory)", n)
	}
	if w := gathered(t, a.reg, "shoal_cache_evict_walks_total"); w != 0 {
		t.Fatalf("A walked %v times, want 0", w)
	}
	if stored(dx) {
		t.Fatal("A kept x, the least recently used unreferenced blob, over the bound")
	}
	if !stored(dy) {
		t.Fatal("A evicted y, which B stored three minutes ago and A never saw")
	}
	if !stored(dp) || !stored(dq) {
		t.Fatal("A evicted a blob that a cached manifest references")
	}
	if got := gathered(t, a.reg, "shoal_cache_evicted_blobs_total"); got != 1 {
		t.Fatalf("A evicted %v blobs, want 1", got)
	}
}
