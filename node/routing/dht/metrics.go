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
			Help: "Provider announcements (advertise or reprovide of one key) that failed.",
		}),
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
