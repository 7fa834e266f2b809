package budget

import (
	"context"
	"errors"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

// clock is a settable clock for tests, starting at the real now so state
// TTLs (real durations) stay meaningful.
type clock struct {
	mu sync.Mutex
	t  time.Time
}

func newClock() *clock { return &clock{t: time.Now()} }

func (c *clock) Now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.t }

func (c *clock) Advance(d time.Duration) { c.mu.Lock(); c.t = c.t.Add(d); c.mu.Unlock() }

// response builds an upstream response to method path with header pairs.
func response(status int, method, path string, kv ...string) *http.Response {
	h := http.Header{}
	for i := 0; i+1 < len(kv); i += 2 {
		h.Set(kv[i], kv[i+1])
	}
	u := &url.URL{Scheme: "https", Host: "registry-1.docker.io", Path: path}
	return &http.Response{StatusCode: status, Header: h, Request: &http.Request{Method: method, URL: u}}
}

const (
	up    = "docker.io"
	acct  = "anonymous"
	mpath = "/v2/library/alpine/manifests/latest"
)

func limited(limit, remaining int) *http.Response {
	return response(200, http.MethodHead, mpath,
		HeaderLimit, itoa(limit)+";w=21600", HeaderRemaining, itoa(remaining)+";w=21600")
}

func itoa(n int) string { return strconv.Itoa(n) }

func status(t *testing.T, b *Budget) Status {
	t.Helper()
	sts, err := b.Snapshot(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range sts {
		if s.Upstream == up && s.Account == acct {
			return s
		}
	}
	t.Fatalf("no status for %s/%s in %+v", up, acct, sts)
	return Status{}
}

func TestAllow(t *testing.T) {
	tests := []struct {
		name    string
		observe []*http.Response
		spend   int
		advance time.Duration
		cold    bool
		reason  string // "" means allowed
		retry   time.Duration
	}{
		{name: "unknown_budget_allows"},
		{name: "remaining_above_reserve_allows", observe: []*http.Response{limited(100, 20)}},
		{name: "nothing_remaining_refuses", observe: []*http.Response{limited(100, 0)}, reason: "exhausted", retry: 6 * time.Hour},
		{name: "nothing_remaining_refuses_cold_too", observe: []*http.Response{limited(100, 0)}, cold: true, reason: "exhausted", retry: 6 * time.Hour},
		{name: "reserve_is_kept_for_cold_pulls", observe: []*http.Response{limited(100, 5)}, reason: "reserve", retry: 6 * time.Hour},
		{name: "cold_pull_may_use_the_reserve", observe: []*http.Response{limited(100, 5)}, cold: true},
		{name: "spend_eats_into_remaining", observe: []*http.Response{limited(100, 7)}, spend: 2, reason: "reserve", retry: 6 * time.Hour},
		{name: "window_over_allows_again", observe: []*http.Response{limited(100, 0)}, advance: 6*time.Hour + time.Second},
		{name: "manifest_without_headers_is_unlimited",
			observe: []*http.Response{limited(100, 0), response(200, http.MethodGet, mpath)}},
		{name: "blob_without_headers_changes_nothing",
			observe: []*http.Response{limited(100, 0), response(200, http.MethodGet, "/v2/library/alpine/blobs/sha256:ab")},
			reason:  "exhausted", retry: 6 * time.Hour},
		{name: "429_with_retry_after_blocks_for_it",
			observe: []*http.Response{response(429, http.MethodGet, mpath, "Retry-After", "30")}, cold: true,
			reason: "throttled", retry: 30 * time.Second},
		{name: "429_without_retry_after_blocks_for_rest_of_window",
			observe: []*http.Response{limited(100, 50), response(429, http.MethodGet, mpath)}, advance: time.Hour,
			reason: "throttled", retry: 5 * time.Hour},
		{name: "bare_429_blocks_for_a_minute",
			observe: []*http.Response{response(429, http.MethodGet, mpath)}, reason: "throttled", retry: time.Minute},
		{name: "block_ends",
			observe: []*http.Response{response(429, http.MethodGet, mpath, "Retry-After", "30")}, advance: 31 * time.Second},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			clk := newClock()
			b := New(NewMemoryState(), WithReserve(5), WithClock(clk.Now))
			ctx := context.Background()
			for _, r := range tt.observe {
				b.Observe(ctx, up, acct, r)
			}
			for range tt.spend {
				b.Spend(ctx, up, acct)
			}
			clk.Advance(tt.advance)
			err := b.Allow(ctx, up, acct, tt.cold)
			if tt.reason == "" {
				if err != nil {
					t.Fatalf("Allow = %v, want nil", err)
				}
				return
			}
			var ee *ExhaustedError
			if !errors.As(err, &ee) || !errors.Is(err, ErrExhausted) {
				t.Fatalf("Allow = %v, want *ExhaustedError", err)
			}
			if ee.Reason != tt.reason || ee.RetryAfter != tt.retry {
				t.Fatalf("Allow = %q retry %v, want %q retry %v", ee.Reason, ee.RetryAfter, tt.reason, tt.retry)
			}
		})
	}
}

func TestObserveReadsHeaders(t *testing.T) {
	b := New(NewMemoryState(), WithReserve(3))
	b.Observe(context.Background(), up, acct, limited(100, 42))
	s := status(t, b)
	if s.Limit != 100 || s.Remaining != 42 || s.Window != 6*time.Hour || s.Reserve != 3 {
		t.Fatalf("status = %+v", s)
	}
	b.Spend(context.Background(), up, acct)
	if s := status(t, b); s.Remaining != 41 || s.Spent != 1 {
		t.Fatalf("after Spend: %+v, want remaining 41 spent 1", s)
	}
	// The next header is authoritative again.
	b.Observe(context.Background(), up, acct, limited(100, 40))
	if s := status(t, b); s.Remaining != 40 {
		t.Fatalf("after refresh: remaining %d, want 40", s.Remaining)
	}
}

func TestProjectedExhaustion(t *testing.T) {
	clk := newClock()
	b := New(NewMemoryState(), WithClock(clk.Now), WithRateWindow(10*time.Minute))
	ctx := context.Background()
	if s := func() []Status { s, _ := b.Snapshot(ctx); return s }(); len(s) != 0 {
		t.Fatalf("snapshot of empty budget = %+v", s)
	}
	b.Observe(ctx, up, acct, limited(100, 100))
	if s := status(t, b); s.ExhaustsIn >= 0 {
		t.Fatalf("no consumption yet: ExhaustsIn = %v, want negative (not in sight)", s.ExhaustsIn)
	}
	// One counted request per second for a while: ~1 req/s after decay.
	for range 60 {
		clk.Advance(time.Second)
		b.Spend(ctx, up, acct)
	}
	s := status(t, b)
	if s.Remaining != 40 || s.Rate <= 0 {
		t.Fatalf("status = %+v", s)
	}
	// The rate estimate lags (EWMA), so the projection is at least the
	// true 40s and well below the window.
	if s.ExhaustsIn < 40*time.Second || s.ExhaustsIn > time.Hour {
		t.Fatalf("ExhaustsIn = %v, want between 40s and 1h", s.ExhaustsIn)
	}
	// Consumption stops: the projection grows.
	clk.Advance(30 * time.Minute)
	if later := status(t, b); later.ExhaustsIn <= s.ExhaustsIn {
		t.Fatalf("ExhaustsIn after idle = %v, want more than %v", later.ExhaustsIn, s.ExhaustsIn)
	}
}

func TestMetrics(t *testing.T) {
	b := New(NewMemoryState(), WithReserve(10))
	ctx := context.Background()
	b.Observe(ctx, up, acct, limited(100, 30))
	b.Observe(ctx, up, acct, response(429, http.MethodGet, mpath, "Retry-After", "5"))
	b.Observe(ctx, "ghcr.io", "alice", response(200, http.MethodGet, "/v2/a/manifests/1"))
	reg := prometheus.NewPedanticRegistry()
	if err := reg.Register(b.Collector()); err != nil {
		t.Fatal(err)
	}
	want := `
# HELP shoal_budget_limit Counted upstream requests allowed per window (0: unknown or unlimited).
# TYPE shoal_budget_limit gauge
shoal_budget_limit{account="alice",upstream="ghcr.io"} 0
shoal_budget_limit{account="anonymous",upstream="docker.io"} 100
# HELP shoal_budget_remaining Counted upstream requests remaining in the current window.
# TYPE shoal_budget_remaining gauge
shoal_budget_remaining{account="alice",upstream="ghcr.io"} 0
shoal_budget_remaining{account="anonymous",upstream="docker.io"} 30
# HELP shoal_budget_window_seconds Length of the upstream rate-limit window.
# TYPE shoal_budget_window_seconds gauge
shoal_budget_window_seconds{account="alice",upstream="ghcr.io"} 0
shoal_budget_window_seconds{account="anonymous",upstream="docker.io"} 21600
# HELP shoal_budget_reserve Counted requests kept for cold pulls.
# TYPE shoal_budget_reserve gauge
shoal_budget_reserve{account="alice",upstream="ghcr.io"} 10
shoal_budget_reserve{account="anonymous",upstream="docker.io"} 10
# HELP shoal_budget_exhaustion_seconds Projected time until the budget is exhausted at the recent consumption rate (+Inf: not in sight).
# TYPE shoal_budget_exhaustion_seconds gauge
shoal_budget_exhaustion_seconds{account="alice",upstream="ghcr.io"} +Inf
shoal_budget_exhaustion_seconds{account="anonymous",upstream="docker.io"} 0
# HELP shoal_upstream_throttled_total 429 Too Many Requests answers received from the upstream.
# TYPE shoal_upstream_throttled_total counter
shoal_upstream_throttled_total{account="alice",upstream="ghcr.io"} 0
shoal_upstream_throttled_total{account="anonymous",upstream="docker.io"} 1
`
	if err := testutil.GatherAndCompare(reg, strings.NewReader(want)); err != nil {
		t.Fatal(err)
	}
}

// TestReplicasShareRedis: two Budgets on one Redis see each other's Spend
// and 429, as two cache replicas do.
func TestReplicasShareRedis(t *testing.T) {
	rc := newRedis(t)
	a := New(NewRedisState(rc, "shoal:budget:"), WithReserve(2))
	b := New(NewRedisState(rc, "shoal:budget:"), WithReserve(2))
	ctx := context.Background()

	a.Observe(ctx, up, acct, limited(100, 10))
	var wg sync.WaitGroup
	for range 7 {
		wg.Go(func() { b.Spend(ctx, up, acct) })
	}
	wg.Wait()
	if s := status(t, a); s.Remaining != 3 || s.Spent != 7 {
		t.Fatalf("replica a sees %+v, want remaining 3 spent 7", s)
	}
	b.Spend(ctx, up, acct)
	if err := a.Allow(ctx, up, acct, false); !errors.Is(err, ErrExhausted) {
		t.Fatalf("a.Allow warm with only the reserve left = %v, want ErrExhausted", err)
	}
	if err := a.Allow(ctx, up, acct, true); err != nil {
		t.Fatalf("a.Allow cold = %v, want nil", err)
	}

	b.Observe(ctx, up, acct, response(429, http.MethodGet, mpath, "Retry-After", "120"))
	var ee *ExhaustedError
	if err := a.Allow(ctx, up, acct, true); !errors.As(err, &ee) || ee.Reason != "throttled" ||
		ee.RetryAfter <= 100*time.Second || ee.RetryAfter > 120*time.Second {
		t.Fatalf("a.Allow after b's 429 = %v, want throttled ~120s", err)
	}
	if s := status(t, a); s.Throttled != 1 {
		t.Fatalf("a sees throttled %d, want 1", s.Throttled)
	}
	ttl, err := rc.PTTL(ctx, "shoal:budget:docker.io/anonymous").Result()
	if err != nil || ttl <= 0 || ttl > 6*time.Hour+time.Minute {
		t.Fatalf("key TTL = %v, %v; want it to expire within the window", ttl, err)
	}
}

func TestStateErrorsFailOpen(t *testing.T) {
	rc := newRedis(t)
	b := New(NewRedisState(rc, "x:"))
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := b.Allow(ctx, up, acct, false); err != nil {
		t.Fatalf("Allow with unreachable state = %v, want nil (fail open)", err)
	}
	if _, err := b.Snapshot(ctx); err == nil {
		t.Fatal("Snapshot with unreachable state succeeded, want error")
	}
}

// TestTakeIsAtomicAcrossReplicas: two Budgets on one Redis race 40 warm
// Takes with 5 counted requests left above the reserve: exactly 5 pass,
// none eats into the reserve.
func TestTakeIsAtomicAcrossReplicas(t *testing.T) {
	rdb := newRedis(t)
	b1 := New(NewRedisState(rdb, "t:"), WithReserve(10))
	b2 := New(NewRedisState(rdb, "t:"), WithReserve(10))
	ctx := context.Background()
	b1.Observe(ctx, up, acct, limited(100, 15))
	var wg sync.WaitGroup
	var mu sync.Mutex
	passed := 0
	for i := range 40 {
		b := b1
		if i%2 == 1 {
			b = b2
		}
		wg.Go(func() {
			if b.Take(ctx, up, acct) == nil {
				mu.Lock()
				passed++
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	if passed != 5 {
		t.Fatalf("%d Takes passed, want exactly 5 (15 remaining, reserve 10)", passed)
	}
	if s := status(t, b1); s.Remaining != 10 || s.Spent != 5 {
		t.Fatalf("after the race: remaining %d spent %d, want 10 and 5", s.Remaining, s.Spent)
	}
	// A cold pull may still spend the reserve.
	if err := b2.Take(WithCold(ctx, true), up, acct); err != nil {
		t.Fatalf("cold Take with the reserve left: %v", err)
	}
}

// TestHugeDelaysDoNotOverflow: a window or Retry-After far beyond any real
// one is capped, never wrapped into a negative or tiny duration.
func TestHugeDelaysDoNotOverflow(t *testing.T) {
	for _, v := range []string{"100;w=9999999999999", "100;w=9223372036854775807"} {
		_, w, ok := ParseHeader(v)
		if !ok || w != maxDelay {
			t.Errorf("ParseHeader(%q) window = %v ok=%v, want %v", v, w, ok, maxDelay)
		}
	}
	now := time.Now()
	for _, v := range []string{"9999999999999", "99999999999999999999999999", "18446744073709551615"} {
		d, ok := ParseRetryAfter(v, now)
		if !ok || d != maxDelay {
			t.Errorf("ParseRetryAfter(%q) = %v ok=%v, want %v", v, d, ok, maxDelay)
		}
	}
	b := New(NewMemoryState())
	ctx := context.Background()
	b.Observe(ctx, "docker.io", "a", response(429, "GET", "/v2/x/manifests/y", "Retry-After", "99999999999999999999"))
	err := b.Allow(ctx, "docker.io", "a", true)
	var ex *ExhaustedError
	if !errors.As(err, &ex) || ex.RetryAfter <= 0 {
		t.Fatalf("after a 429 with a huge Retry-After: %v; want refused with a positive RetryAfter", err)
	}
}
