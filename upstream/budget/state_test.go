package budget

import (
	"context"
	"maps"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/shoal-oci/shoal/test/harness"
)

// newRedis returns a client to a fresh redis-server that stops with the test.
func newRedis(t *testing.T) redis.UniversalClient {
	t.Helper()
	return harness.RedisClient(t, harness.StartRedis(t))
}

// stateImpls lists every State implementation; each runs the same suite.
func stateImpls() map[string]func(t *testing.T) State {
	return map[string]func(t *testing.T) State{
		"memory": func(*testing.T) State { return NewMemoryState() },
		"redis":  func(t *testing.T) State { return NewRedisState(newRedis(t), "test:budget:") },
		"fallback_redis_up": func(t *testing.T) State {
			return NewFallbackState(NewRedisState(newRedis(t), "test:budget:"), NewMemoryState(), nil)
		},
		"fallback_redis_gone": func(t *testing.T) State {
			// A client to a port nothing listens on: every call falls back.
			c := redis.NewClient(&redis.Options{Addr: "127.0.0.1:1", DialTimeout: 100 * time.Millisecond, MaxRetries: -1})
			t.Cleanup(func() { _ = c.Close() })
			return NewFallbackState(NewRedisState(c, "test:budget:"), NewMemoryState(), nil)
		},
	}
}

func TestStateConformance(t *testing.T) {
	for name, newState := range stateImpls() {
		t.Run(name, func(t *testing.T) {
			t.Run("absent_key_loads_zero_record", func(t *testing.T) {
				s := newState(t)
				k := Key{Upstream: "docker.io", Account: "anonymous"}
				r, err := s.Load(context.Background(), k)
				if err != nil || !recordEqual(r, Record{Key: k}) {
					t.Fatalf("Load = %+v, %v; want zero record", r, err)
				}
			})
			t.Run("update_round_trips_every_field", func(t *testing.T) {
				s := newState(t)
				ctx := context.Background()
				k := Key{Upstream: "ghcr.io", Account: "user/with:odd chars"}
				now := time.Now().Round(0).Truncate(time.Millisecond)
				want := Record{Key: k, Limit: 100, Remaining: 7, Window: time.Hour, ResetAt: now.Add(time.Hour),
					ObservedAt: now, BlockedUntil: now.Add(time.Minute), Spent: 3, Throttled: 1, Rate: 0.5, RateAt: now,
					Clients: map[string]int{"10.0.0.1": 2, "10.0.0.2": 1}, ClientsSince: now}
				got, err := s.Update(ctx, k, func(r *Record) time.Duration {
					*r = want
					r.Clients = maps.Clone(want.Clients)
					r.Key = Key{} // the key is the state's business
					return time.Minute
				})
				if err != nil {
					t.Fatal(err)
				}
				if !recordEqual(got, want) {
					t.Fatalf("Update returned %+v, want %+v", got, want)
				}
				loaded, err := s.Load(ctx, k)
				if err != nil || !recordEqual(loaded, want) {
					t.Fatalf("Load = %+v, %v; want %+v", loaded, err, want)
				}
				list, err := s.List(ctx)
				if err != nil || len(list) != 1 || !recordEqual(list[0], want) {
					t.Fatalf("List = %+v, %v; want [%+v]", list, err, want)
				}
			})
			t.Run("keys_are_independent", func(t *testing.T) {
				s := newState(t)
				ctx := context.Background()
				a, b := Key{"docker.io", "alice"}, Key{"docker.io", "bob"}
				inc := func(r *Record) time.Duration { r.Spent++; return time.Minute }
				for range 2 {
					mustUpdate(t, s, a, inc)
				}
				mustUpdate(t, s, b, inc)
				list, err := s.List(ctx)
				if err != nil || len(list) != 2 || list[0].Spent != 2 || list[1].Spent != 1 {
					t.Fatalf("List = %+v, %v; want alice 2, bob 1", list, err)
				}
			})
			t.Run("records_expire_after_their_ttl", func(t *testing.T) {
				s := newState(t)
				k := Key{"quay.io", "anonymous"}
				mustUpdate(t, s, k, func(r *Record) time.Duration { r.Spent = 1; return 50 * time.Millisecond })
				time.Sleep(120 * time.Millisecond)
				r, err := s.Load(context.Background(), k)
				if err != nil || r.Spent != 0 {
					t.Fatalf("Load after ttl = %+v, %v; want expired", r, err)
				}
				if list, _ := s.List(context.Background()); len(list) != 0 {
					t.Fatalf("List after ttl = %+v, want empty", list)
				}
			})
			t.Run("concurrent_updates_are_not_lost", func(t *testing.T) {
				s := newState(t)
				k := Key{"docker.io", "anonymous"}
				const workers, each = 8, 10
				var wg sync.WaitGroup
				for range workers {
					wg.Go(func() {
						for range each {
							mustUpdate(t, s, k, func(r *Record) time.Duration { r.Spent++; return time.Minute })
						}
					})
				}
				wg.Wait()
				r, err := s.Load(context.Background(), k)
				if err != nil || r.Spent != workers*each {
					t.Fatalf("Spent = %d, %v; want %d", r.Spent, err, workers*each)
				}
			})
		})
	}
}

func mustUpdate(t *testing.T, s State, k Key, fn func(*Record) time.Duration) {
	t.Helper()
	if _, err := s.Update(context.Background(), k, fn); err != nil {
		t.Error(err)
	}
}

func recordEqual(a, b Record) bool {
	return a.Key == b.Key && a.Limit == b.Limit && a.Remaining == b.Remaining && a.Window == b.Window &&
		a.ResetAt.Equal(b.ResetAt) && a.ObservedAt.Equal(b.ObservedAt) && a.BlockedUntil.Equal(b.BlockedUntil) &&
		a.Spent == b.Spent && a.Throttled == b.Throttled && a.Rate == b.Rate && a.RateAt.Equal(b.RateAt) &&
		maps.Equal(a.Clients, b.Clients) && a.ClientsSince.Equal(b.ClientsSince)
}
