package herd

import (
	"errors"
	"slices"
	"testing"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/redis/go-redis/v9"

	"github.com/shoal-oci/shoal/test/harness"
)

// downHealth reports Redis down.
type downHealth struct{ reported error }

func (downHealth) Up() bool            { return false }
func (h *downHealth) Report(err error) { h.reported = err }

// TestSharedHerdSpansReplicas: two replicas on one real Redis chain one
// herd. The first node, on replica A, is served; the next, on replica B,
// is sent to it; the third, on A, to both, nearest first. A forced node is
// served. With Redis down, a replica tracks its herds alone.
func TestSharedHerdSpansReplicas(t *testing.T) {
	rdb := harness.RedisClient(t, harness.StartRedis(t))
	ta, _, _ := newTracker(t, 1)
	tb, _, _ := newTracker(t, 1)
	a, b := NewShared(rdb, "t:herd:", ta, nil, nil), NewShared(rdb, "t:herd:", tb, nil, nil)

	rs, done := join(a, "sha256:x", "n0", false)
	if len(rs) != 0 || done == nil {
		t.Fatalf("first node: receivers %v, want served", rs)
	}
	defer done(1)
	if rs, _ := join(b, "sha256:x", "n1", false); !slices.Equal(rs, []string{"n0"}) {
		t.Fatalf("second node on the other replica: receivers %v, want [n0]", rs)
	}
	if rs, _ := join(a, "sha256:x", "n2", false); !slices.Equal(rs, []string{"n1", "n0"}) {
		t.Fatalf("third node: receivers %v, want [n1 n0]", rs)
	}
	if rs, _ := join(b, "sha256:x", "n1", false); !slices.Equal(rs, []string{"n0"}) {
		t.Fatalf("second node asking again: receivers %v, want the same [n0]", rs)
	}
	if rs, d := join(b, "sha256:x", "n2", true); len(rs) != 0 || d == nil {
		t.Fatalf("forced node: receivers %v, want served", rs)
	}
	if rs, _ := join(b, "sha256:y", "n5", false); len(rs) != 0 {
		t.Fatalf("another blob: receivers %v, want served (its own herd)", rs)
	}
	if v := testutil.ToFloat64(tb.metrics.requests.WithLabelValues("redirected")); v != 2 {
		t.Fatalf("replica B counted %v redirects, want 2", v)
	}

	// Redis down: each replica alone. B has seen no herd for z, so it serves.
	h := &downHealth{}
	down := NewShared(rdb, "t:herd:", tb, h, nil)
	if _, d := join(a, "sha256:z", "n0", false); d == nil {
		t.Fatal("first node of z not served")
	}
	if rs, d := join(down, "sha256:z", "n1", false); len(rs) != 0 || d == nil {
		t.Fatalf("with Redis down: receivers %v, want served by this replica", rs)
	}
	// A Redis that stops answering: the script fails and the replica
	// falls back to its own tracker.
	broken := redis.NewClient(&redis.Options{Addr: "127.0.0.1:1", MaxRetries: -1})
	t.Cleanup(func() { _ = broken.Close() })
	h2 := &downHealth{}
	up := NewShared(broken, "t:herd:", tb, &upThenReport{h: h2}, nil)
	if rs, d := join(up, "sha256:w", "n9", false); len(rs) != 0 || d == nil {
		t.Fatalf("with Redis unreachable: receivers %v, want served", rs)
	}
	if h2.reported == nil || errors.Is(h2.reported, redis.Nil) {
		t.Fatalf("the failure was not reported to health: %v", h2.reported)
	}
}

// upThenReport says Redis is up and passes reports on.
type upThenReport struct{ h *downHealth }

func (u *upThenReport) Up() bool         { return true }
func (u *upThenReport) Report(err error) { u.h.Report(err) }

// TestHerdPassesAddresses: a redirected node is told each receiver's
// addresses as the receiver last gave them, by the local tracker and by
// the shared one alike.
func TestHerdPassesAddresses(t *testing.T) {
	rdb := harness.RedisClient(t, harness.StartRedis(t))
	local, _, _ := newTracker(t, 1)
	other, _, _ := newTracker(t, 1)
	for name, j := range map[string]joiner{"local": local, "shared": NewShared(rdb, "t:addrs:", other, nil, nil)} {
		t.Run(name, func(t *testing.T) {
			a0, a1 := "/ip4/10.0.0.1/tcp/5001", "/ip4/10.0.0.2/tcp/5001,/ip6/fd00::2/tcp/5001"
			if rs, done := j.Join("k", Member{ID: "n0", Addrs: a0}, false); len(rs) != 0 || done == nil {
				t.Fatalf("n0: %v, want served", rs)
			}
			if rs, _ := j.Join("k", Member{ID: "n1"}, false); !slices.Equal(rs, []Member{{ID: "n0", Addrs: a0}}) {
				t.Fatalf("n1 told %+v", rs)
			}
			j.Join("k", Member{ID: "n1", Addrs: a1}, false) // n1 asks again, now with addresses
			if rs, _ := j.Join("k", Member{ID: "n2"}, false); !slices.Equal(rs, []Member{{ID: "n1", Addrs: a1}, {ID: "n0", Addrs: a0}}) {
				t.Fatalf("n2 told %+v", rs)
			}
		})
	}
}
