package dht

import (
	"errors"
	"fmt"

	"github.com/prometheus/client_golang/prometheus"
)

// metrics are the router's Prometheus collectors.
type metrics struct {
	lookupDuration prometheus.Histogram
	advertisedKeys prometheus.Gauge
	peers          prometheus.Gauge
	provideErrors  prometheus.Counter
	lookups        *prometheus.CounterVec
	cachedKeys     prometheus.Gauge
	announcements  *prometheus.CounterVec
	announceErrors prometheus.Counter
}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	m := &metrics{
		lookupDuration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "shoal_dht_lookup_duration_seconds",
			Help:    "Time a DHT Lookup took, including the reachability check of the providers found.",
			Buckets: []float64{.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5},
		}),
		advertisedKeys: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "shoal_dht_advertised_keys",
			Help: "Keys (digests and tags) this node currently advertises in the DHT.",
		}),
		peers: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "shoal_dht_peers",
			Help: "Peers in this node's DHT routing table.",
		}),
		provideErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "shoal_dht_provide_errors_total",
			Help: "Advertise calls the sweeping provider refused.",
		}),
		lookups: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "shoal_dht_lookups_total",
			Help: "Lookups by how they were answered: cache (known holders, no DHT query), dht (a DHT query found a holder), miss (nobody reachable holds the key).",
		}, []string{"result"}),
		cachedKeys: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "shoal_dht_cached_keys",
			Help: "Keys whose holders this node knows from announcements and earlier lookups.",
		}),
		announcements: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "shoal_dht_announcements_total",
			Help: "Announcement messages (each carries up to 4096 keys): sent and received over gossipsub, and fetched from a peer's holdings when first connected to it.",
		}, []string{"direction"}),
		announceErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "shoal_dht_announce_errors_total",
			Help: "Announcement messages that could not be published (the DHT still carries the keys).",
		}),
	}
	for _, r := range []string{"cache", "dht", "miss"} {
		m.lookups.WithLabelValues(r)
	}
	for _, d := range []string{"sent", "received", "fetched"} {
		m.announcements.WithLabelValues(d)
	}
	if reg == nil {
		return m, nil
	}
	var err error
	if m.lookupDuration, err = register(reg, m.lookupDuration); err != nil {
		return nil, err
	}
	if m.advertisedKeys, err = register(reg, m.advertisedKeys); err != nil {
		return nil, err
	}
	if m.peers, err = register(reg, m.peers); err != nil {
		return nil, err
	}
	if m.provideErrors, err = register(reg, m.provideErrors); err != nil {
		return nil, err
	}
	if m.lookups, err = register(reg, m.lookups); err != nil {
		return nil, err
	}
	if m.cachedKeys, err = register(reg, m.cachedKeys); err != nil {
		return nil, err
	}
	if m.announcements, err = register(reg, m.announcements); err != nil {
		return nil, err
	}
	if m.announceErrors, err = register(reg, m.announceErrors); err != nil {
		return nil, err
	}
	return m, nil
}

// register registers c, or returns the collector already registered under
// the same name (a router restarted in the same process).
func register[T prometheus.Collector](reg prometheus.Registerer, c T) (T, error) {
	err := reg.Register(c)
	if err == nil {
		return c, nil
	}
	var are prometheus.AlreadyRegisteredError
	if errors.As(err, &are) {
		if existing, ok := are.ExistingCollector.(T); ok {
			return existing, nil
		}
	}
	return c, fmt.Errorf("register metric: %w", err)
}
