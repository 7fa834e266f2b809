package herd

import (
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

// joiner is a Tracker or a Shared.
type joiner interface {
	Join(key string, node Member, force bool) ([]Member, func(int64))
}

// join joins node, with no addresses, and returns the receivers' IDs.
func join(j joiner, key, node string, force bool) ([]string, func(int64)) {
	rs, done := j.Join(key, Member{ID: node}, force)
	var ids []string
	for _, m := range rs {
		ids = append(ids, m.ID)
	}
	return ids, done
}

type clock struct{ t time.Time }

func (c *clock) now() time.Time { return c.t }

func newTracker(t *testing.T, direct int) (*Tracker, *clock, *prometheus.Registry) {
	t.Helper()
	c := &clock{t: time.Unix(1_700_000_000, 0)}
	reg := prometheus.NewRegistry()
	tr, err := New(Config{Direct: direct, Now: c.now, Registerer: reg})
	if err != nil {
		t.Fatal(err)
	}
	return tr, c, reg
}

// TestHerdChains: the first Direct nodes are served; every later one is
// sent to nodes ahead of it in one of Direct chains, each node followed by
// at most one other, so every uplink carries one copy.
func TestHerdChains(t *testing.T) {
	tr, _, reg := newTracker(t, 2)
	served := 0
	followers := map[string]int{}
	depth := map[string]int{}
	for i := range 32 {
		id := fmt.Sprintf("n%02d", i)
		rs, done := join(tr, "blob:a", id, false)
		if len(rs) == 0 {
			served++
			depth[id] = 0
			defer done(100)
			continue
		}
		if done != nil {
			t.Fatalf("%s: redirected with a done func", id)
		}
		if len(rs) > 3 {
			t.Fatalf("%s: told %d receivers, want at most 3", id, len(rs))
		}
		followers[rs[0]]++
		depth[id] = depth[rs[0]] + 1
		for j := 1; j < len(rs); j++ {
			if depth[rs[j]] != depth[rs[j-1]]-1 {
				t.Fatalf("%s: receivers %v are not its chain, nearest first", id, rs)
			}
		}
	}
	if served != 2 {
		t.Fatalf("%d of 32 nodes served by the cache tier, want 2", served)
	}
	for id, n := range followers {
		if n > 1 {
			t.Fatalf("%s has %d followers, want at most 1", id, n)
		}
	}
	if d := slices.Max(mapValues(depth)); d != 15 {
		t.Fatalf("deepest node at depth %d, want 15 (two chains of 16)", d)
	}
	if got := testutil.ToFloat64(tr.metrics.requests.WithLabelValues("redirected")); got != 30 {
		t.Fatalf("redirected = %v, want 30", got)
	}
	_ = reg
}

func mapValues(m map[string]int) []int {
	var out []int
	for _, v := range m {
		out = append(out, v)
	}
	return out
}

// TestHerdAskAgain: a redirected node that asks again gets the same
// receivers; one that forces is served, and counts as a copy.
func TestHerdAskAgain(t *testing.T) {
	tr, _, _ := newTracker(t, 1)
	_, done := join(tr, "k", "root", false)
	first, _ := join(tr, "k", "b", false)
	again, _ := join(tr, "k", "b", false)
	if !slices.Equal(first, []string{"root"}) || !slices.Equal(again, first) {
		t.Fatalf("b told %v, then %v; want [root] twice", first, again)
	}
	rs, forced := join(tr, "k", "b", true)
	if len(rs) != 0 || forced == nil {
		t.Fatalf("forced request redirected to %v", rs)
	}
	forced(10)
	done(10)
	// The root asking again (another chunk) is served again.
	if rs, d := join(tr, "k", "root", false); len(rs) != 0 || d == nil {
		t.Fatalf("root asking again redirected to %v", rs)
	}
}

// TestHerdEnds: a herd is dropped once Linger passes with no join and no
// direct stream, and its size and copies are observed; a new herd then
// starts with direct nodes again.
func TestHerdEnds(t *testing.T) {
	tr, c, reg := newTracker(t, 1)
	_, done := join(tr, "k", "a", false)
	join(tr, "k", "b", false)
	c.t = c.t.Add(2 * time.Minute)
	join(tr, "other", "x", false) // sweeps; "k" still has a direct stream
	if _, ok := tr.herds["k"]; !ok {
		t.Fatal("herd dropped while its direct stream runs")
	}
	done(4096)
	c.t = c.t.Add(2 * time.Minute)
	if rs, _ := join(tr, "k", "c", false); len(rs) != 0 {
		t.Fatalf("c joined an ended herd: told %v", rs)
	}
	want := `
# HELP shoal_cache_herd_copies Copies of one blob the cache tier sent in one herd, observed when the herd ends.
# TYPE shoal_cache_herd_copies histogram
shoal_cache_herd_copies_bucket{le="1"} 1
shoal_cache_herd_copies_bucket{le="2"} 1
shoal_cache_herd_copies_bucket{le="3"} 1
shoal_cache_herd_copies_bucket{le="4"} 1
shoal_cache_herd_copies_bucket{le="6"} 1
shoal_cache_herd_copies_bucket{le="8"} 1
shoal_cache_herd_copies_bucket{le="16"} 1
shoal_cache_herd_copies_bucket{le="32"} 1
shoal_cache_herd_copies_bucket{le="64"} 1
shoal_cache_herd_copies_bucket{le="+Inf"} 1
shoal_cache_herd_copies_sum 1
shoal_cache_herd_copies_count 1
`
	if err := testutil.GatherAndCompare(reg, strings.NewReader(want), "shoal_cache_herd_copies"); err != nil {
		t.Fatal(err)
	}
	if got := testutil.ToFloat64(tr.metrics.herds); got != 1 {
		t.Fatalf("shoal_cache_herds = %v, want 1", got)
	}
}

// TestHerdBounds: past MaxHerds or MaxMembers, nodes are served, so a flood
// of blobs or node IDs costs bounded memory and never a failed pull.
func TestHerdBounds(t *testing.T) {
	c := &clock{t: time.Unix(0, 0)}
	tr, err := New(Config{Direct: 1, MaxHerds: 2, MaxMembers: 3, Now: c.now})
	if err != nil {
		t.Fatal(err)
	}
	join(tr, "a", "n0", false)
	join(tr, "b", "n0", false)
	if rs, d := join(tr, "c", "n0", false); len(rs) != 0 || d == nil {
		t.Fatal("a third herd was tracked past MaxHerds")
	}
	join(tr, "a", "n1", false)
	join(tr, "a", "n2", false)
	if rs, d := join(tr, "a", "n3", false); len(rs) != 0 || d == nil {
		t.Fatalf("n3 redirected to %v past MaxMembers", rs)
	}
}
