// Package budget keeps the rate-limit budget per (upstream, account).
//
// It reads the ratelimit-limit and ratelimit-remaining headers ("N;w=S") of
// upstream responses, counts what Docker Hub counts (manifest GETs), keeps a
// reserve for cold pulls, honours 429 answers, and projects when the budget
// runs out. Records live in a State: in memory for one process, or in Redis
// for replicas that share the same upstream accounts.
package budget

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net/http"
	"strconv"
	"strings"
	"time"
)

// ErrExhausted is matched (errors.Is) by every *ExhaustedError.
var ErrExhausted = errors.New("upstream rate-limit budget exhausted")

// ExhaustedError is returned by Allow when a counted request must not be made.
type ExhaustedError struct {
	Upstream, Account string
	// Reason is "throttled" (after a 429), "exhausted" (nothing remains),
	// "reserve" (only the cold-pull reserve remains) or ClientShareReason
	// (this client used its share of the window).
	Reason string
	// RetryAfter is when the budget is expected to allow again; 0 if unknown.
	RetryAfter time.Duration
	// ClientUsed and ClientLimit are set when Reason is ClientShareReason:
	// the counted requests this client caused in the window, and its cap.
	ClientUsed, ClientLimit int
}

// Error implements error.
func (e *ExhaustedError) Error() string {
	return fmt.Sprintf("%v: %s for %s (%s), retry after %s", ErrExhausted, e.Reason, e.Upstream, e.Account, e.RetryAfter.Round(time.Second))
}

// Is makes errors.Is(err, ErrExhausted) true.
func (e *ExhaustedError) Is(target error) bool { return target == ErrExhausted }

// Header names read by Observe.
const (
	HeaderLimit     = "ratelimit-limit"
	HeaderRemaining = "ratelimit-remaining"
)

const (
	defaultBlock   = 60 * time.Second
	defaultTTL     = time.Hour
	defaultRateTau = 10 * time.Minute
)

// Budget decides whether a counted upstream request may be made. It is safe
// for concurrent use; all shared data lives in its State.
type Budget struct {
	state   State
	reserve int
	share   float64
	tau     time.Duration
	now     func() time.Time
	log     *slog.Logger
}

// Option configures a Budget.
type Option func(*Budget)

// WithReserve keeps the last n counted requests of every window for cold
// pulls (content the cache has never held).
func WithReserve(n int) Option { return func(b *Budget) { b.reserve = max(n, 0) } }

// WithClientShare caps the counted requests one client (node) may cause in
// a window at share of the window's limit (rounded up, at least 1), so that
// no client drains the budget for the rest. 0 or >= 1 disables the cap. The
// client comes from the context (WithClient).
func WithClientShare(share float64) Option { return func(b *Budget) { b.share = share } }

// WithRateWindow sets the time constant of the consumption-rate estimate
// used to project exhaustion (default 10 minutes).
func WithRateWindow(d time.Duration) Option {
	return func(b *Budget) {
		if d > 0 {
			b.tau = d
		}
	}
}

// WithClock replaces time.Now, for tests.
func WithClock(now func() time.Time) Option { return func(b *Budget) { b.now = now } }

// WithLogger sets the logger (default: discard).
func WithLogger(l *slog.Logger) Option { return func(b *Budget) { b.log = l } }

// New returns a Budget on state.
func New(state State, opts ...Option) *Budget {
	b := &Budget{
		state: state,
		tau:   defaultRateTau,
		now:   time.Now,
		log:   slog.New(slog.NewTextHandler(io.Discard, nil)),
	}
	for _, o := range opts {
		o(b)
	}
	return b
}

// Reserve returns the number of counted requests kept for cold pulls.
func (b *Budget) Reserve() int { return b.reserve }

// ttl is how long a record should live: its window, or until its block ends,
// or an hour for records without a window.
func (b *Budget) ttl(r *Record, now time.Time) time.Duration {
	ttl := r.Window
	if ttl <= 0 {
		ttl = defaultTTL
	}
	if d := r.ResetAt.Sub(now); d > ttl {
		ttl = d
	}
	if d := r.BlockedUntil.Sub(now); d > ttl {
		ttl = d
	}
	return ttl
}

// Observe records what an upstream response says about the budget. Every
// upstream response may be passed:
//   - ratelimit-limit (and ratelimit-remaining) headers replace the known
//     limit, remaining count and window;
//   - a successful manifest response (path contains /manifests/) without
//     them marks the budget unlimited;
//   - a 429 blocks counted requests for Retry-After, else the rest of the
//     known window, else the window, else 60s;
//   - anything else (tokens, blobs, errors) is ignored.
func (b *Budget) Observe(ctx context.Context, upstream, account string, resp *http.Response) {
	if resp == nil {
		return
	}
	limit, window, hasLimit := ParseHeader(resp.Header.Get(HeaderLimit))
	if resp.Header.Get(HeaderLimit) == "" {
		hasLimit = false
	}
	remaining, rwindow, hasRemaining := ParseHeader(resp.Header.Get(HeaderRemaining))
	if resp.Header.Get(HeaderRemaining) == "" {
		hasRemaining = false
	}
	if window == 0 {
		window = rwindow
	}
	throttled := resp.StatusCode == http.StatusTooManyRequests
	manifestOK := resp.StatusCode/100 == 2 && resp.Request != nil && resp.Request.URL != nil &&
		strings.Contains(resp.Request.URL.Path, "/manifests/")
	if !hasLimit && !hasRemaining && !throttled && !manifestOK {
		return
	}
	retryAfter, hasRetryAfter := ParseRetryAfter(resp.Header.Get("Retry-After"), b.now())
	key := Key{Upstream: upstream, Account: account}
	_, err := b.state.Update(ctx, key, func(r *Record) time.Duration {
		now := b.now()
		switch {
		case hasLimit || hasRemaining:
			if hasLimit {
				r.Limit = limit
			}
			if hasRemaining {
				r.Remaining = remaining
				if !hasLimit && r.Limit < remaining {
					r.Limit = remaining
				}
			} else if r.Remaining > r.Limit || r.ObservedAt.IsZero() {
				r.Remaining = r.Limit
			}
			if window > 0 {
				r.Window = window
			}
			r.ObservedAt = now
			r.ResetAt = time.Time{}
			if r.Window > 0 {
				r.ResetAt = now.Add(r.Window)
			}
		case manifestOK:
			r.Limit, r.Remaining, r.Window = 0, 0, 0
			r.ObservedAt, r.ResetAt = now, time.Time{}
		}
		if throttled {
			r.Throttled++
			var d time.Duration
			switch {
			case hasRetryAfter:
				d = retryAfter
			case r.ResetAt.After(now):
				d = r.ResetAt.Sub(now)
			case r.Window > 0:
				d = r.Window
			default:
				d = defaultBlock
			}
			if until := now.Add(d); until.After(r.BlockedUntil) {
				r.BlockedUntil = until
			}
		}
		return b.ttl(r, now)
	})
	if err != nil {
		b.log.WarnContext(ctx, "budget: observe failed", "upstream", upstream, "account", account, "err", err)
	}
}

// coldKey marks a context whose counted request is a cold pull.
type coldKey struct{}

// WithCold marks ctx as carrying a cold pull (content never cached), which
// may spend the reserve. Take reads it.
func WithCold(ctx context.Context, cold bool) context.Context {
	return context.WithValue(ctx, coldKey{}, cold)
}

func isCold(ctx context.Context) bool {
	c, _ := ctx.Value(coldKey{}).(bool)
	return c
}

// clientKey carries the client (node) a counted request is made for.
type clientKey struct{}

// WithClient records in ctx which client (a node's address) a counted
// request is made for; Take charges it against its share.
func WithClient(ctx context.Context, client string) context.Context {
	return context.WithValue(ctx, clientKey{}, client)
}

func clientOf(ctx context.Context) string {
	c, _ := ctx.Value(clientKey{}).(string)
	return c
}

// ClientShareReason is the ExhaustedError reason when one client used its
// share of the window.
const ClientShareReason = "client-share"

// checkClient refuses a client that has used its share of the window, and
// otherwise charges it. It restarts the per-client counts every window.
func (b *Budget) checkClient(r *Record, now time.Time, upstream, account, client string) error {
	if client == "" || b.share <= 0 || b.share >= 1 || r.Limit <= 0 {
		return nil
	}
	window := r.Window
	if window <= 0 {
		window = defaultTTL
	}
	if r.ClientsSince.IsZero() || !now.Before(r.ClientsSince.Add(window)) {
		r.Clients, r.ClientsSince = nil, now
	}
	limit := max(1, int(math.Ceil(b.share*float64(r.Limit))))
	if r.Clients[client] >= limit {
		return &ExhaustedError{Upstream: upstream, Account: account, Reason: ClientShareReason,
			RetryAfter: r.ClientsSince.Add(window).Sub(now), ClientUsed: r.Clients[client], ClientLimit: limit}
	}
	if r.Clients == nil {
		r.Clients = map[string]int{}
	}
	r.Clients[client]++
	return nil
}

// Take decides and records one counted request in a single atomic update
// of the state, so that replicas sharing it cannot all pass the check
// before any of them spends (check-then-act overshoots into the reserve).
// It refuses exactly as Allow does, with the cold flag from WithCold, and
// otherwise spends as Spend does. The upstream client calls it just before
// every manifest GET. If the state cannot be written, Take logs and allows:
// the upstream's own 429 is the backstop.
func (b *Budget) Take(ctx context.Context, upstream, account string) error {
	cold, client := isCold(ctx), clientOf(ctx)
	var refusal error
	_, err := b.state.Update(ctx, Key{Upstream: upstream, Account: account}, func(r *Record) time.Duration {
		now := b.now()
		refusal = b.check(r, now, upstream, account, cold)
		if refusal == nil {
			refusal = b.checkClient(r, now, upstream, account, client)
		}
		if refusal == nil {
			b.spend(r, now)
		}
		return b.ttl(r, now)
	})
	if err != nil {
		b.log.WarnContext(ctx, "budget: take failed, allowing", "upstream", upstream, "account", account, "err", err)
		return nil
	}
	return refusal
}

// Allow reports whether one counted request (a manifest GET) may be made.
// It refuses with an *ExhaustedError after a 429 until the block ends, when
// nothing remains, and when only the reserve remains unless cold is true.
// An unknown or unlimited budget allows. If the state cannot be read, Allow
// logs and allows: the upstream's own 429 is the backstop.
func (b *Budget) Allow(ctx context.Context, upstream, account string, cold bool) error {
	r, err := b.state.Load(ctx, Key{Upstream: upstream, Account: account})
	if err != nil {
		b.log.WarnContext(ctx, "budget: load failed, allowing", "upstream", upstream, "account", account, "err", err)
		return nil
	}
	return b.check(&r, b.now(), upstream, account, cold)
}

// check is Allow's decision on a loaded record.
func (b *Budget) check(r *Record, now time.Time, upstream, account string, cold bool) error {
	refuse := func(reason string, retry time.Duration) error {
		return &ExhaustedError{Upstream: upstream, Account: account, Reason: reason, RetryAfter: max(retry, 0)}
	}
	if now.Before(r.BlockedUntil) {
		return refuse("throttled", r.BlockedUntil.Sub(now))
	}
	if r.Limit <= 0 || (!r.ResetAt.IsZero() && !now.Before(r.ResetAt)) {
		return nil
	}
	var retry time.Duration
	if !r.ResetAt.IsZero() {
		retry = r.ResetAt.Sub(now)
	}
	if r.Remaining <= 0 {
		return refuse("exhausted", retry)
	}
	if r.Remaining <= b.reserve && !cold {
		return refuse("reserve", retry)
	}
	return nil
}

// Spend records one counted request: it decrements the remaining count
// until the next ratelimit header replaces it, and feeds the consumption
// rate. Call it when the request is sent; the response's own headers, which
// already count it, then overwrite the estimate.
func (b *Budget) Spend(ctx context.Context, upstream, account string) {
	_, err := b.state.Update(ctx, Key{Upstream: upstream, Account: account}, func(r *Record) time.Duration {
		now := b.now()
		b.spend(r, now)
		return b.ttl(r, now)
	})
	if err != nil {
		b.log.WarnContext(ctx, "budget: spend failed", "upstream", upstream, "account", account, "err", err)
	}
}

func (b *Budget) spend(r *Record, now time.Time) {
	r.Spent++
	if r.Limit > 0 && r.Remaining > 0 {
		r.Remaining--
	}
	r.Rate = b.decayed(r, now) + 1/b.tau.Seconds()
	r.RateAt = now
}

// decayed returns the record's rate estimate as of now.
func (b *Budget) decayed(r *Record, now time.Time) float64 {
	if r.Rate == 0 || r.RateAt.IsZero() {
		return 0
	}
	dt := now.Sub(r.RateAt).Seconds()
	if dt <= 0 {
		return r.Rate
	}
	return r.Rate * math.Exp(-dt/b.tau.Seconds())
}

// Status is one budget as reported by Snapshot.
type Status struct {
	Upstream, Account string
	// Limit is 0 when unknown or unlimited.
	Limit, Remaining int
	Window           time.Duration
	Reserve          int
	// Throttled counts the 429 answers received; Spent the counted requests.
	Throttled, Spent int
	BlockedUntil     time.Time
	// Rate is the recent consumption in counted requests per second.
	Rate float64
	// ExhaustsIn projects when Remaining reaches 0 at the recent Rate. It is
	// 0 when exhausted or blocked, and negative when no exhaustion is in
	// sight (unlimited, or no recent consumption).
	ExhaustsIn time.Duration
}

// Snapshot returns the status of every known budget.
func (b *Budget) Snapshot(ctx context.Context) ([]Status, error) {
	recs, err := b.state.List(ctx)
	if err != nil {
		return nil, fmt.Errorf("budget: snapshot: %w", err)
	}
	now := b.now()
	out := make([]Status, 0, len(recs))
	for i := range recs {
		r := &recs[i]
		s := Status{
			Upstream: r.Key.Upstream, Account: r.Key.Account,
			Limit: r.Limit, Remaining: r.Remaining, Window: r.Window, Reserve: b.reserve,
			Throttled: r.Throttled, Spent: r.Spent, BlockedUntil: r.BlockedUntil,
			Rate: b.decayed(r, now), ExhaustsIn: -1,
		}
		switch {
		case now.Before(r.BlockedUntil):
			s.ExhaustsIn = 0
		case r.Limit <= 0:
		case r.Remaining <= 0:
			s.ExhaustsIn = 0
		case s.Rate > 0:
			s.ExhaustsIn = time.Duration(float64(r.Remaining) / s.Rate * float64(time.Second))
		}
		out = append(out, s)
	}
	return out, nil
}

// ParseRetryAfter parses a Retry-After value: delay seconds or an HTTP date
// (relative to now).
func ParseRetryAfter(v string, now time.Time) (time.Duration, bool) {
	v = strings.TrimSpace(v)
	if v == "" {
		return 0, false
	}
	if s, err := strconv.ParseUint(v, 10, 64); err == nil {
		return seconds(int(min(s, uint64(maxDelay/time.Second)))), true
	} else if errors.Is(err, strconv.ErrRange) {
		return maxDelay, true // all digits, too many of them
	}
	if t, err := http.ParseTime(v); err == nil {
		return min(max(t.Sub(now), 0), maxDelay), true
	}
	return 0, false
}
