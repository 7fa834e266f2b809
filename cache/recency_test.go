package cache_test

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	"github.com/redis/go-redis/v9"

	"github.com/shoal-oci/shoal/cache"
	"github.com/shoal-oci/shoal/cache/flight"
	"github.com/shoal-oci/shoal/cache/recency"
	"github.com/shoal-oci/shoal/test/harness"
	"github.com/shoal-oci/shoal/test/hub"
	"github.com/shoal-oci/shoal/upstream"
	"github.com/shoal-oci/shoal/upstream/budget"
)

// TestEvictionSharesRecencyAcrossReplicas: two replicas on one storage and
// one Redis. What replica A serves counts as recent for replica B's
// eviction pass, so B evicts the blob nobody used, not the one A is
// serving; and while A holds the eviction lock, B's pass does nothing.
func TestEvictionSharesRecencyAcrossReplicas(t *testing.T) {
	h := hub.Start(t)
	opts, err := redis.ParseURL(harness.StartRedis(t))
	if err != nil {
		t.Fatal(err)
	}
	rdb := redis.NewClient(opts)
	t.Cleanup(func() { _ = rdb.Close() })
	ctx := context.Background()
	storageDir := t.TempDir()
	clk := &clock{t: time.Now()}
	x, y := harness.RandomLayer(t, 20_000), harness.RandomLayer(t, 20_000)
	h.Push(t, "library/loose", "v1", harness.ImageWithLayers(t, x, y))
	dx, nx := layerDigest(t, x)
	dy, ny := layerDigest(t, y)

	type replica struct {
		c   *cache.Cache
		srv *httptest.Server
		rs  *recency.Redis
	}
	start := func() replica {
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
		drv, err := cache.NewDriver(ctx, "filesystem", map[string]any{"rootdirectory": storageDir})
		if err != nil {
			t.Fatal(err)
		}
		rs := recency.NewRedis(rdb, "t:evict:", nil, nil)
		c, err := cache.New(ctx, cache.Config{Driver: drv, Upstream: up, Flight: fl, Budget: budget.New(budget.NewMemoryState()),
			Registries: []string{h.Host()}, MaxSize: nx + ny - 1, EvictInterval: time.Hour, EvictShare: rs, Now: clk.now})
		if err != nil {
			t.Fatal(err)
		}
		srv := httptest.NewServer(c)
		t.Cleanup(srv.Close)
		return replica{c: c, srv: srv, rs: rs}
	}
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
