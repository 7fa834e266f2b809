package cache

import "github.com/prometheus/client_golang/prometheus"

type metrics struct {
	requests      *prometheus.CounterVec
	stale         *prometheus.CounterVec
	served        prometheus.Counter
	upstreamBytes prometheus.Counter
	storage       prometheus.Gauge
	evicted       prometheus.Counter
}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	m := &metrics{
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "shoal_cache_requests_total",
			Help: "Cache tier requests by result (hit, miss, revalidated, stale, error) and kind (manifest, blob).",
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
	}
	// Pre-create the label sets dashboards plot, so they read 0, not "no data".
	for _, r := range []string{resultHit, resultMiss, resultRevalidated, resultStale, resultError} {
		for _, k := range []string{"manifest", "blob"} {
			m.requests.WithLabelValues(r, k)
		}
	}
	for _, r := range []string{"rate_limited", "unavailable", "timeout"} {
		m.stale.WithLabelValues(r)
	}
	for _, c := range []prometheus.Collector{m.requests, m.stale, m.served, m.upstreamBytes, m.storage, m.evicted} {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	return m, nil
}
