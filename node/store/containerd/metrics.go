package containerd

import (
	"github.com/prometheus/client_golang/prometheus"
)

type metrics struct {
	keys          prometheus.Gauge
	resubscribes  prometheus.Counter
	configProblem *prometheus.GaugeVec
}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	m := &metrics{
		keys: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "shoal_store_keys",
			Help: "Keys (digests and tags) the local store can serve.",
		}),
		resubscribes: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "shoal_store_resubscribes_total",
			Help: "Times the store re-subscribed to containerd's events after the stream broke.",
		}),
		configProblem: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "shoal_containerd_config_problem",
			Help: "1 when containerd's config has the named problem that defeats the node mirror.",
		}, []string{"problem"}),
	}
	if reg == nil {
		return m, nil
	}
	for _, c := range []prometheus.Collector{m.keys, m.resubscribes, m.configProblem} {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	return m, nil
}
