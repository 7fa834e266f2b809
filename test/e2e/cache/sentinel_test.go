package cache_e2e

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/shoal-oci/shoal/test/harness"
	"github.com/shoal-oci/shoal/test/hub"
)

// TestRedisSentinelFailover: two replicas share storage and a Redis behind
// Redis Sentinel (a primary, a replica, three Sentinels), through the
// failover form of --redis-url. The primary is SIGKILLed. While the
// Sentinels elect the replica, pulls complete (the replicas run degraded,
// each blob still fetched upstream once). After the failover both replicas
// share leases through the new primary: concurrent cold pulls through both
// cost one upstream GET per blob, and the budget written before the kill is
// still there.
func TestRedisSentinelFailover(t *testing.T) {
	h := hub.Start(t)
	sn := harness.StartSentinel(t)
	r1, r2 := startSharedReplicas(t, h, sn.URL)
	for _, c := range []*cacheProc{r1, r2} {
		waitRedisUp(t, c, true, 15*time.Second, "reaches the primary")
	}

	warm := harness.RandomImage(t, 2, 64<<10)
	h.Push(t, "library/warm", "v1", warm)
	pullAll(t, r1, h, "library/warm", "v1", imageContent(t, warm))
	budgetKeys := func(addr string) ([]string, error) {
		c := redis.NewClient(&redis.Options{Addr: addr})
		defer c.Close()
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		return c.Keys(ctx, "shoal:budget:*").Result()
	}
	eventually(t, 10*time.Second, "the budget reaches the replica", func() error {
		keys, err := budgetKeys(sn.Replica.Addr)
		if err != nil || len(keys) == 0 {
			return fmt.Errorf("budget keys on the replica: %v %v", keys, err)
		}
		return nil
	})

	sn.Primary.Kill()
	killed := time.Now()

	// During the failover: cached and cold content, through both.
	before := h.Counts()
	pullAll(t, r2, h, "library/warm", "v1", imageContent(t, warm))
	during := harness.RandomImage(t, 2, 128<<10)
	h.Push(t, "library/during", "v1", during)
	for _, c := range []*cacheProc{r1, r2} {
		pullAll(t, c, h, "library/during", "v1", imageContent(t, during))
	}
	if d := h.Counts().BlobGET - before.BlobGET; d != 3 {
		t.Errorf("upstream blob GETs during the failover = %d, want 3 (config + 2 layers, once each)", d)
	}

	eventually(t, 30*time.Second, "the Sentinels promote the replica", func() error {
		addr, err := sn.MasterAddr()
		if err != nil {
			return err
		}
		if addr != sn.Replica.Addr {
			return fmt.Errorf("primary is %s, want %s", addr, sn.Replica.Addr)
		}
		return nil
	})
	promoted := time.Since(killed)
	for _, c := range []*cacheProc{r1, r2} {
		waitRedisUp(t, c, true, 30*time.Second, "uses the new primary")
	}
	t.Logf("failover window: replica promoted %s after the kill, both cache replicas on it %s after", promoted.Round(100*time.Millisecond), time.Since(killed).Round(100*time.Millisecond))
	if keys, err := budgetKeys(sn.Replica.Addr); err != nil || len(keys) == 0 {
		t.Errorf("budget keys on the new primary: %v %v; want the ones written before the kill", keys, err)
	}

	// After the failover, leases are shared again: concurrent cold pulls
	// through both replicas, with a slow upstream so that they overlap.
	after := harness.RandomImage(t, 2, 512<<10)
	h.Push(t, "library/after", "v1", after)
	h.SetBandwidth(1 << 20)
	before = h.Counts()
	want := imageContent(t, after)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	var wg sync.WaitGroup
	errs := make(chan error, 4)
	for _, c := range []*cacheProc{r1, r2, r1, r2} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			got, err := ggcrPull(ctx, c.addr, "library/after", "v1", h.Host())
			if err == nil {
				err = want.same(got)
			}
			if err != nil {
				errs <- fmt.Errorf("pull through %s: %w", c.name, err)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if d := h.Counts().BlobGET - before.BlobGET; d != 3 {
		t.Errorf("upstream blob GETs for 4 concurrent pulls after the failover = %d, want 3", d)
	}
	if d := h.Counts().ManifestGET - before.ManifestGET; d != 1 {
		t.Errorf("counted manifest GETs after the failover = %d, want 1", d)
	}
}
