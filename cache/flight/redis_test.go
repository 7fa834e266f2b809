package flight_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/redis/go-redis/v9"

	"github.com/shoal-oci/shoal/cache/flight"
	"github.com/shoal-oci/shoal/cache/flight/flighttest"
	"github.com/shoal-oci/shoal/test/harness"
)

// replica is one cache replica: its own Local group and Redis client.
func replica(t *testing.T, client redis.UniversalClient, reg prometheus.Registerer, opts ...flight.Option) *flight.Redis {
	t.Helper()
	l := newLocal(t, flight.WithRegisterer(reg))
	return flight.NewRedis(l, client, append([]flight.Option{flight.WithPoll(5*time.Millisecond, 50*time.Millisecond)}, opts...)...)
}

func TestRedisConformance(t *testing.T) {
	url := harness.StartRedis(t)
	var n atomic.Int32
	flighttest.Conformance(t, func(t *testing.T) flighttest.Flight {
		// A fresh key space per subtest, on the one server.
		prefix := fmt.Sprintf("conformance%d:", n.Add(1))
		return replica(t, harness.RedisClient(t, url), nil, flight.WithKeyPrefix(prefix))
	})
}

func TestRedis(t *testing.T) {
	url := harness.StartRedis(t)

	t.Run("second_replica_reads_what_the_first_committed", func(t *testing.T) {
		regA, regB := prometheus.NewRegistry(), prometheus.NewRegistry()
		a := replica(t, harness.RedisClient(t, url), regA)
		b := replica(t, harness.RedisClient(t, url), regB)
		store, key := flighttest.NewStore(), "sha256:shared"
		src := flighttest.Source(t, 32<<10)
		var fetches atomic.Int32
		release := make(chan struct{})
		job := store.Job(key, func(ctx context.Context, w io.Writer) error {
			fetches.Add(1)
			<-release
			_, err := w.Write(src)
			return err
		})
		ra, err := a.Do(t.Context(), key, job)
		if err != nil {
			close(release)
			t.Fatal(err)
		}
		defer ra.Body.Close()
		// A holds the lease now: B waits for it.
		type res struct {
			r   flight.Result
			err error
			at  time.Time
		}
		bDone := make(chan res, 1)
		go func() {
			r, err := b.Do(t.Context(), key, job)
			bDone <- res{r, err, time.Now()}
		}()
		select {
		case r := <-bDone:
			close(release)
			t.Fatalf("B returned while A still fetched: %+v", r)
		case <-time.After(100 * time.Millisecond):
		}
		close(release)
		got, err := io.ReadAll(ra.Body)
		if err != nil || !bytes.Equal(got, src) {
			t.Fatalf("A read %d bytes, err %v", len(got), err)
		}
		rb := <-bDone
		if rb.err != nil {
			t.Fatal(rb.err)
		}
		if !rb.r.Elsewhere || rb.r.Body != nil || rb.r.Leader {
			t.Fatalf("B result = %+v, want Elsewhere with no body", rb.r)
		}
		if _, ok := store.Get(key); !ok {
			t.Fatal("B was told Elsewhere before A committed")
		}
		if n := fetches.Load(); n != 1 {
			t.Fatalf("Fetch ran %d times across replicas, want 1", n)
		}
		if !ra.Leader {
			t.Error("A was not the leader")
		}
		if got := gauge(t, regB, "shoal_flight_deduplicated_total"); got != 1 {
			t.Errorf("B deduplicated = %v, want 1", got)
		}
		probe := harness.RedisClient(t, url)
		waitFor(t, func() bool { return probe.Exists(t.Context(), "shoal:flight:"+key).Val() == 0 })
	})

	t.Run("lease_of_a_dead_replica_is_taken_over", func(t *testing.T) {
		ttl := 300 * time.Millisecond
		clientA := harness.RedisClient(t, url)
		regB := prometheus.NewRegistry()
		a := replica(t, clientA, nil, flight.WithLeaseTTL(ttl))
		b := replica(t, harness.RedisClient(t, url), regB, flight.WithLeaseTTL(ttl))
		store, key := flighttest.NewStore(), "sha256:takeover"
		src := flighttest.Source(t, 16<<10)

		// A's fetch hangs, and A loses Redis, so its renewals stop.
		hang := make(chan struct{})
		defer close(hang)
		ra, err := a.Do(t.Context(), key, store.Job(key, func(ctx context.Context, w io.Writer) error {
			<-hang
			return errors.New("replica A died")
		}))
		if err != nil {
			t.Fatal(err)
		}
		defer ra.Body.Close()
		clientA.Close()

		start := time.Now()
		rb, err := b.Do(t.Context(), key, store.Job(key, func(ctx context.Context, w io.Writer) error {
			_, err := w.Write(src)
			return err
		}))
		if err != nil {
			t.Fatal(err)
		}
		defer rb.Body.Close()
		if waited := time.Since(start); waited < ttl/2 {
			t.Errorf("B became leader after %v, before A's lease (ttl %v) could expire", waited, ttl)
		}
		if !rb.Leader || rb.Elsewhere {
			t.Fatalf("B result = %+v, want leader", rb)
		}
		got, err := io.ReadAll(rb.Body)
		if err != nil || !bytes.Equal(got, src) {
			t.Fatalf("B read %d bytes, err %v", len(got), err)
		}
		waitFor(t, func() bool { _, ok := store.Get(key); return ok })
		if got := gauge(t, regB, "shoal_flight_lease_takeovers_total"); got != 1 {
			t.Errorf("takeovers = %v, want 1", got)
		}
	})

	t.Run("lease_is_renewed_while_the_fetch_runs", func(t *testing.T) {
		ttl := 200 * time.Millisecond
		a := replica(t, harness.RedisClient(t, url), nil, flight.WithLeaseTTL(ttl))
		store, key := flighttest.NewStore(), "sha256:renew"
		release := make(chan struct{})
		r, err := a.Do(t.Context(), key, store.Job(key, func(ctx context.Context, w io.Writer) error {
			<-release
			_, err := w.Write([]byte("done"))
			return err
		}))
		if err != nil {
			t.Fatal(err)
		}
		defer r.Body.Close()
		time.Sleep(3 * ttl)
		n := harness.RedisClient(t, url).Exists(t.Context(), "shoal:flight:"+key).Val()
		close(release)
		if n != 1 {
			t.Fatalf("lease gone after 3×ttl of a running fetch")
		}
		waitFor(t, func() bool { _, ok := store.Get(key); return ok })
	})

	t.Run("failed_fetch_releases_the_lease", func(t *testing.T) {
		a := replica(t, harness.RedisClient(t, url), nil)
		store, key := flighttest.NewStore(), "sha256:release-on-error"
		r, err := a.Do(t.Context(), key, store.Job(key, func(ctx context.Context, w io.Writer) error {
			return errors.New("upstream 500")
		}))
		if err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadAll(r.Body); err == nil {
			t.Fatal("read of a failed fetch succeeded")
		}
		r.Body.Close()
		if n := harness.RedisClient(t, url).Exists(t.Context(), "shoal:flight:"+key).Val(); n != 0 {
			t.Fatal("lease still held after the fetch failed")
		}
	})

	t.Run("waiting_caller_respects_its_context", func(t *testing.T) {
		key := "sha256:held"
		other := harness.RedisClient(t, url)
		if err := other.Set(t.Context(), "shoal:flight:"+key, "someone-else", 10*time.Second).Err(); err != nil {
			t.Fatal(err)
		}
		b := replica(t, harness.RedisClient(t, url), nil)
		store := flighttest.NewStore()
		ctx, cancel := context.WithTimeout(t.Context(), 100*time.Millisecond)
		defer cancel()
		_, err := b.Do(ctx, key, store.Job(key, func(ctx context.Context, w io.Writer) error { return nil }))
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("err = %v, want the caller's deadline", err)
		}
		// The other replica goes away uncommitted: the flight, which outlived
		// its caller, takes over and fills the cache.
		other.Del(t.Context(), "shoal:flight:"+key)
		waitFor(t, func() bool { _, ok := store.Get(key); return ok })
	})

	t.Run("unreachable_redis_still_fetches", func(t *testing.T) {
		dead := redis.NewClient(&redis.Options{Addr: fmt.Sprintf("127.0.0.1:%d", harness.FreePort(t)), DialTimeout: 100 * time.Millisecond, MaxRetries: -1})
		t.Cleanup(func() { dead.Close() })
		a := replica(t, dead, nil)
		store, key := flighttest.NewStore(), "sha256:noredis"
		src := flighttest.Source(t, 1024)
		r, err := a.Do(t.Context(), key, store.Job(key, func(ctx context.Context, w io.Writer) error {
			_, err := w.Write(src)
			return err
		}))
		if err != nil {
			t.Fatal(err)
		}
		defer r.Body.Close()
		if got, err := io.ReadAll(r.Body); err != nil || !bytes.Equal(got, src) {
			t.Fatalf("read %d bytes, err %v", len(got), err)
		}
	})
}
