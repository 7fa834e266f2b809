// Package cache is the shared pull-through cache: a distribution-API
// handler (pull side) on distribution v3 storage. It fetches each digest from
// upstream once (cache/flight), revalidates tags with free HEAD requests
// within a freshness window, spends the Docker Hub budget only where a pull
// needs it (upstream/budget), and serves stale content when upstream is
// rate-limited or down.
package cache

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"time"

	"github.com/distribution/distribution/v3/registry/storage"
	storagedriver "github.com/distribution/distribution/v3/registry/storage/driver"
	"github.com/opencontainers/go-digest"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/shoal-oci/shoal/cache/flight"
	"github.com/shoal-oci/shoal/cache/herd"
	"github.com/shoal-oci/shoal/upstream"
)

// Flight runs one fetch per key, across callers and replicas.
// *flight.Local and *flight.Redis implement it.
type Flight interface {
	Do(ctx context.Context, key string, job flight.Job) (flight.Result, error)
}

// Upstream is the client to the real registries. *upstream.Client implements it.
type Upstream interface {
	HeadManifest(ctx context.Context, registry, repo, ref string) (upstream.Descriptor, error)
	GetManifest(ctx context.Context, registry, repo, ref string) ([]byte, upstream.Descriptor, error)
	GetBlob(ctx context.Context, registry, repo string, dgst digest.Digest, offset int64) (io.ReadCloser, int64, error)
	Account(registry string) string
}

// Budget decides whether a counted upstream request may be spent.
// *budget.Budget implements it.
type Budget interface {
	Allow(ctx context.Context, upstream, account string, cold bool) error
}

// Config configures a Cache.
type Config struct {
	// Driver is the distribution storage driver. Required.
	Driver   storagedriver.StorageDriver
	Upstream Upstream // required
	Flight   Flight   // required
	Budget   Budget   // nil: no budget checks
	// Registries lists the upstream registries served, by host ("docker.io").
	// A request for any other ?ns= gets 404 NAME_UNKNOWN.
	Registries []string
	// TagFreshness is how long a tag is served without asking upstream.
	// 0 revalidates on every pull (a free HEAD each time); `shoal cache`
	// defaults it to 5m. Negative values count as 0.
	TagFreshness time.Duration
	// TagFreshnessBy overrides TagFreshness per registry.
	TagFreshnessBy map[string]time.Duration
	// UpstreamTimeout bounds a revalidation or a manifest fetch: past it, a
	// cached tag is served stale. Default 5s.
	UpstreamTimeout time.Duration
	// UpstreamIdleTimeout fails a blob fetch whose upstream body sends
	// nothing for this long, so a stalled upstream does not hold the flight
	// and its waiters. Default 30s.
	UpstreamIdleTimeout time.Duration
	// ReplicaClient carries this replica's relays of a fetch in progress
	// from the replica that holds its lease; it must send the client token
	// the replicas require. Default: a client without proxy or token, with
	// short dial and header timeouts.
	ReplicaClient *http.Client
	// MaxSize bounds the stored blobs in bytes; 0 means unbounded.
	MaxSize int64
	// EvictShare shares recency and the eviction pass across replicas on
	// shared storage (*recency.Redis). Nil: this replica's view only.
	EvictShare EvictShare
	// Herd spreads a blob that many nodes ask for at once over the nodes
	// (*herd.Tracker): the first few are served, the rest are sent to the
	// nodes receiving it. Nil: every node is served.
	Herd Herd
	// EvictInterval is how often the size bound is enforced. Default 1m.
	EvictInterval time.Duration
	// EvictGrace protects content used this recently from eviction: a
	// pull in progress has fetched a manifest and is still fetching its
	// layers. Default DefaultEvictGrace.
	EvictGrace time.Duration
	// DrainTimeout bounds how long Run waits, once its context ends, for
	// fetches in flight to commit. Default 30s.
	DrainTimeout time.Duration
	Logger       *slog.Logger
	Registerer   prometheus.Registerer
	// Now is the clock; default time.Now.
	Now func() time.Time
}

// Herd decides, for a node's blob request, whether the cache tier serves it
// or sends the node to nodes that are receiving the blob (oci/herd.go).
type Herd interface {
	// Join returns the receivers to send node to, or none and a done func
	// to call with the bytes sent when the cache tier serves it. force:
	// the node's receivers could not serve it.
	Join(key string, node herd.Member, force bool) (receivers []herd.Member, done func(sent int64))
}

// Cache is the pull-through cache. It implements http.Handler.
type Cache struct {
	cfg        Config
	store      *store
	registries map[string]bool
	metrics    *metrics
	evict      *evictor
}

// ReplicaTransport is the transport for relays between replicas: no proxy,
// short dial and header timeouts, no compression.
func ReplicaTransport() *http.Transport {
	return &http.Transport{
		DialContext:           (&net.Dialer{Timeout: 2 * time.Second}).DialContext,
		ResponseHeaderTimeout: 10 * time.Second,
		DisableCompression:    true,
		MaxIdleConnsPerHost:   16,
	}
}

// New builds a Cache on cfg.Driver.
func New(ctx context.Context, cfg Config) (*Cache, error) {
	if cfg.Driver == nil || cfg.Upstream == nil || cfg.Flight == nil {
		return nil, errors.New("cache: Driver, Upstream and Flight are required")
	}
	if cfg.UpstreamTimeout <= 0 {
		cfg.UpstreamTimeout = 5 * time.Second
	}
	if cfg.UpstreamIdleTimeout <= 0 {
		cfg.UpstreamIdleTimeout = 30 * time.Second
	}
	if cfg.ReplicaClient == nil {
		cfg.ReplicaClient = &http.Client{Transport: ReplicaTransport()}
	}
	if cfg.EvictInterval <= 0 {
		cfg.EvictInterval = time.Minute
	}
	if cfg.EvictGrace <= 0 {
		cfg.EvictGrace = DefaultEvictGrace
	}
	if cfg.DrainTimeout <= 0 {
		cfg.DrainTimeout = 30 * time.Second
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Registerer == nil {
		cfg.Registerer = prometheus.NewRegistry()
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	st, err := newStore(ctx, cfg.Driver)
	if err != nil {
		return nil, err
	}
	m, err := newMetrics(cfg.Registerer)
	if err != nil {
		return nil, fmt.Errorf("cache: register metrics: %w", err)
	}
	regs := map[string]bool{}
	for _, r := range cfg.Registries {
		regs[r] = true
	}
	c := &Cache{cfg: cfg, store: st, registries: regs, metrics: m}
	c.evict = newEvictor(st, cfg.MaxSize, cfg.EvictGrace, cfg.Logger, m, cfg.Now, cfg.EvictShare)
	return c, nil
}

// Run enforces the size bound until ctx is done, then waits (up to
// DrainTimeout) for fetches in flight to commit, so that content a client
// already received is not lost when the process exits.
func (c *Cache) Run(ctx context.Context) error {
	defer c.drain()
	purge := time.NewTicker(time.Hour)
	defer purge.Stop()
	c.PurgeUploads(ctx)
	var evict <-chan time.Time
	if c.cfg.MaxSize > 0 {
		t := time.NewTicker(c.cfg.EvictInterval)
		defer t.Stop()
		evict = t.C
		c.runEviction(ctx)
	}
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-evict:
			c.runEviction(ctx)
		case <-purge.C:
			c.PurgeUploads(ctx)
		}
	}
}

func (c *Cache) runEviction(ctx context.Context) {
	if err := c.evict.run(ctx); err != nil && ctx.Err() == nil {
		c.cfg.Logger.WarnContext(ctx, "eviction failed", "err", err)
	}
}

// uploadPurgeAge is how old an unfinished storage upload must be before it
// is removed: a commit takes seconds, so an hour-old upload was left by a
// process that died mid-commit, on this replica or another.
const uploadPurgeAge = time.Hour

// PurgeUploads removes unfinished storage uploads older than an hour, left
// by a replica killed mid-commit (it runs at start and every hour).
func (c *Cache) PurgeUploads(ctx context.Context) {
	c.purgeUploadsBefore(ctx, c.cfg.Now().Add(-uploadPurgeAge))
}

func (c *Cache) purgeUploadsBefore(ctx context.Context, before time.Time) {
	deleted, errs := storage.PurgeUploads(ctx, c.cfg.Driver, before, true)
	if len(deleted) > 0 {
		c.cfg.Logger.InfoContext(ctx, "removed unfinished uploads left by an interrupted commit", "files", len(deleted))
	}
	for _, err := range errs {
		if !isPathNotFound(err) {
			c.cfg.Logger.WarnContext(ctx, "purging unfinished uploads", "err", err)
			break
		}
	}
}

// Ready reports whether the cache can serve: its storage answers. Redis is
// not consulted; without it a replica serves on in-process state.
func (c *Cache) Ready(ctx context.Context) error {
	if _, err := c.cfg.Driver.Stat(ctx, tagRoot); err != nil {
		var nf storagedriver.PathNotFoundError
		if !errors.As(err, &nf) {
			return fmt.Errorf("storage: %w", err)
		}
	}
	return nil
}

// Evict runs one eviction pass now (for tests and operators).
func (c *Cache) Evict(ctx context.Context) error { return c.evict.run(ctx) }

// drain waits, up to DrainTimeout, for the flight's running fetches.
func (c *Cache) drain() {
	ctx, cancel := context.WithTimeout(context.Background(), c.cfg.DrainTimeout)
	defer cancel()
	if err := c.drainFlight(ctx); err != nil {
		c.cfg.Logger.Warn("fetches still running at shutdown; their content is not cached", "err", err)
	}
}

// drainFlight waits until the flight runs no fetch, if it can tell: every
// commit, and the use it records, is done.
func (c *Cache) drainFlight(ctx context.Context) error {
	d, ok := c.cfg.Flight.(interface{ Drain(context.Context) error })
	if !ok {
		return nil
	}
	return d.Drain(ctx)
}
