package cache

import (
	"sync"

	"github.com/prometheus/client_golang/prometheus"
)

type metrics struct {
	requests      *prometheus.CounterVec
	pulls         *boundedCounter
	stale         *prometheus.CounterVec
	served        prometheus.Counter
	upstreamBytes prometheus.Counter
	storage       prometheus.Gauge
	evicted       prometheus.Counter
	evictWalks    prometheus.Counter
	passthrough   prometheus.Counter
}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	m := &metrics{
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "shoal_cache_requests_total",
			Help: "Cache tier requests by result (hit, miss, revalidated, stale, error, redirected) and kind (manifest, blob).",
		}, []string{"result", "kind"}),
		stale: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "shoal_cache_stale_served_total",
			Help: "Cached tags served stale because upstream could not confirm them, by reason (rate_limited, unavailable, timeout).",
		}, []string{"reason"}),
		served: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "shoal_cache_served_bytes_total",
			Help: "Body bytes served to clients.",
		}),
		upstreamBytes: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "shoal_cache_upstream_bytes_total",
			Help: "Body bytes fetched from upstream registries.",
		}),
		storage: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "shoal_cache_storage_bytes",
			Help: "Bytes of blobs in cache storage, as of the last eviction pass.",
		}),
		evicted: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "shoal_cache_evicted_blobs_total",
			Help: "Blobs removed to keep storage under --max-size.",
		}),
		evictWalks: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "shoal_cache_evict_walks_total",
			Help: "Eviction passes that listed the whole storage. With Redis, only the first pass, and one a day, walk; the others read the shared inventory.",
		}),
		passthrough: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "shoal_cache_passthrough_total",
			Help: "Blobs served straight from upstream without caching, because the spool's disk had no room (each one is logged at error level).",
		}),
		pulls: newBoundedCounter(prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "shoal_cache_image_pulls_total",
			Help: "Tag resolutions (image pulls) by registry and repository; past 500 repositories, new ones count as repository=\"other\".",
		}, []string{"registry", "repository"}), 500),
	}
	// Pre-create the label sets dashboards plot, so they read 0, not "no data".
	for _, r := range []string{resultHit, resultMiss, resultRevalidated, resultStale, resultError} {
		for _, k := range []string{"manifest", "blob"} {
			m.requests.WithLabelValues(r, k)
		}
	}
	m.requests.WithLabelValues(resultRedirected, "blob")
	for _, r := range []string{"rate_limited", "unavailable", "timeout"} {
		m.stale.WithLabelValues(r)
	}
	for _, c := range []prometheus.Collector{m.requests, m.pulls.vec, m.stale, m.served, m.upstreamBytes, m.storage, m.evicted, m.evictWalks, m.passthrough} {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	return m, nil
}

// boundedCounter is a counter by (registry, repository) that stops adding
// label sets past a bound, so a flood of distinct names cannot blow up the
// metrics' cardinality.
type boundedCounter struct {
	vec  *prometheus.CounterVec
	max  int
	mu   sync.Mutex
	seen map[[2]string]bool
}

func newBoundedCounter(vec *prometheus.CounterVec, max int) *boundedCounter {
	return &boundedCounter{vec: vec, max: max, seen: map[[2]string]bool{}}
}

func (b *boundedCounter) inc(registry, repo string) {
	b.mu.Lock()
	k := [2]string{registry, repo}
	if !b.seen[k] {
		if len(b.seen) >= b.max {
			repo = "other"
		} else {
			b.seen[k] = true
		}
	}
	b.mu.Unlock()
	b.vec.WithLabelValues(registry, repo).Inc()
}
