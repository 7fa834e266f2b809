package flight

import (
	"fmt"

	"github.com/prometheus/client_golang/prometheus"
)

type metrics struct {
	fetches   *prometheus.CounterVec
	dedup     prometheus.Counter
	waiters   prometheus.Gauge
	takeovers prometheus.Counter
	unleased  prometheus.Counter
	relayed   prometheus.Counter
}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	m := &metrics{
		fetches: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "shoal_flight_fetches_total",
			Help: "Upstream fetches run by flights, by result (committed, fetch_error, commit_error).",
		}, []string{"result"}),
		dedup: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "shoal_flight_deduplicated_total",
			Help: "Callers served by a fetch they did not start, in this process or on another replica.",
		}),
		waiters: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "shoal_flight_waiters",
			Help: "Callers currently attached to a flight, from Do until their Body is closed.",
		}),
		takeovers: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "shoal_flight_lease_takeovers_total",
			Help: "Leases taken after another replica held them and did not commit.",
		}),
		unleased: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "shoal_flight_unleased_total",
			Help: "Fetches started without a cross-replica lease because Redis was unreachable (degraded).",
		}),
		relayed: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "shoal_flight_relayed_total",
			Help: "Flights streamed from the replica holding the lease instead of waiting for its commit.",
		}),
	}
	if reg != nil {
		for _, c := range []prometheus.Collector{m.fetches, m.dedup, m.waiters, m.takeovers, m.unleased, m.relayed} {
			if err := reg.Register(c); err != nil {
				return nil, fmt.Errorf("register flight metrics: %w", err)
			}
		}
	}
	return m, nil
}
