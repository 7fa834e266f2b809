// Package flight fetches each key from upstream at most once, however many
// callers ask for it at the same moment. The first caller for a key starts a
// fetch into a spool file; every caller, the first included, gets a Body that
// streams the spool as it grows, so time to first byte never waits for the
// whole blob. Local does this within one process; Redis adds a lease so that
// replicas sharing storage fetch each key once between them.
package flight

import (
	"context"
	"io"
	"log/slog"
	"os"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Job is the work behind one key.
type Job struct {
	// Fetch streams the content into w (the spool). It runs once per flight,
	// however many callers share it, in its own goroutine with a context
	// detached from the callers. It must verify the bytes; an error aborts the
	// flight: every reader gets the error and Commit is not called.
	Fetch func(ctx context.Context, w io.Writer) error
	// Commit stores the completed spool, for example into distribution
	// storage. It runs once, after Fetch succeeds, with a file of its own
	// positioned at 0 (it may close it). Readers of the flight see io.EOF as
	// soon as Fetch succeeds; they do not wait for Commit.
	Commit func(ctx context.Context, spool *os.File) error
	// Relay streams the content into w from another replica, from, that
	// holds the lease and is fetching it now (its advertised base URL). It
	// lets this replica's callers get headers and bytes as they arrive
	// instead of waiting silently for the other replica's commit. Nil, or a
	// replica that advertises nothing, means wait. A relayed flight is not
	// committed here: the holder commits it.
	Relay func(ctx context.Context, w io.Writer, from string) error
	// Committed reports whether the content is already stored, for example by
	// another replica. Redis polls it while another replica holds the lease.
	// Nil means never.
	Committed func(ctx context.Context) (bool, error)
}

// Result is what Do hands each caller.
type Result struct {
	// Body streams the bytes as the leader fetches them; nil when Elsewhere.
	// The caller must close it. Its reads fail with the fetch's error if the
	// fetch fails, or with the caller's ctx error if that ends first.
	// It also has a method Size(ctx) (int64, error) that returns the total
	// size Fetch announced by calling SetSize(int64) on its writer (-1 when
	// bytes came first), and FinalSize(ctx), which waits for the end of the
	// fetch when no size was announced.
	Body io.ReadCloser
	// Elsewhere is true when another replica fetched and committed the
	// content; read it from storage.
	Elsewhere bool
	// Leader is true for the one caller whose flight ran Fetch.
	Leader bool
}

// Option configures NewLocal and NewRedis. Each option says which
// constructor it applies to; the other ignores it.
type Option func(*config)

type config struct {
	log       *slog.Logger
	reg       prometheus.Registerer
	timeout   time.Duration
	leaseTTL  time.Duration
	pollMin   time.Duration
	pollMax   time.Duration
	prefix    string
	health    Health
	advertise string
}

// Health says whether Redis is reachable now (*health.Watcher implements
// it). While it is not, a Redis flight takes no lease and fetches as a
// Local one would, instead of waiting on Redis timeouts for every key.
type Health interface {
	Up() bool
	Report(err error)
}

func newConfig(opts []Option) config {
	c := config{
		log:      slog.New(slog.DiscardHandler),
		timeout:  30 * time.Minute,
		leaseTTL: 15 * time.Second,
		pollMin:  50 * time.Millisecond,
		pollMax:  500 * time.Millisecond,
		prefix:   "shoal:flight:",
	}
	for _, o := range opts {
		o(&c)
	}
	return c
}

// WithLogger sets the logger (both constructors). The default discards.
func WithLogger(l *slog.Logger) Option {
	return func(c *config) {
		if l != nil {
			c.log = l
		}
	}
}

// WithRegisterer registers the flight metrics with reg (NewLocal only; a
// Redis flight counts into its Local's metrics). The default registers none.
func WithRegisterer(reg prometheus.Registerer) Option {
	return func(c *config) { c.reg = reg }
}

// WithTimeout bounds one flight, from the lease wait through Commit
// (NewLocal only). The default is 30 minutes.
func WithTimeout(d time.Duration) Option {
	return func(c *config) {
		if d > 0 {
			c.timeout = d
		}
	}
}

// WithLeaseTTL sets how long a lease outlives a replica that stopped renewing
// it (NewRedis only). It is renewed every ttl/3. The default is 15 seconds.
func WithLeaseTTL(d time.Duration) Option {
	return func(c *config) {
		if d > 0 {
			c.leaseTTL = d
		}
	}
}

// WithPoll sets how often a replica waiting on another's lease polls,
// starting at min and doubling up to max (NewRedis only). The default is
// 50ms growing to 500ms.
func WithPoll(min, max time.Duration) Option {
	return func(c *config) {
		if min > 0 && max >= min {
			c.pollMin, c.pollMax = min, max
		}
	}
}

// WithHealth makes a Redis flight skip Redis while h says it is down, and
// report the Redis errors it meets to h (NewRedis only).
func WithHealth(h Health) Option {
	return func(c *config) { c.health = h }
}

// WithAdvertise sets the base URL at which other replicas reach this one
// (NewRedis only). It is stored with each lease this replica takes, so that
// a replica waiting on the lease can relay the fetch in progress (Job.Relay)
// instead of sending nothing until the commit. Empty: others wait.
func WithAdvertise(url string) Option {
	return func(c *config) { c.advertise = url }
}

// noRelayKey marks a request that came from another replica's relay.
type noRelayKey struct{}

// NoRelay marks ctx so that a Redis flight never relays it to another
// replica: a relayed request must be answered by the replica it reached,
// or two replicas could relay to each other.
func NoRelay(ctx context.Context) context.Context { return context.WithValue(ctx, noRelayKey{}, true) }

func noRelay(ctx context.Context) bool { v, _ := ctx.Value(noRelayKey{}).(bool); return v }

// WithKeyPrefix sets the prefix of lease keys in Redis (NewRedis only). The
// default is "shoal:flight:".
func WithKeyPrefix(p string) Option {
	return func(c *config) { c.prefix = p }
}
