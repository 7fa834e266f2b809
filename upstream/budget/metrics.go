package budget

import (
	"context"
	"math"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Collector returns a prometheus.Collector that reports every budget from
// Snapshot. Register it on the Registerer the caller was given.
func (b *Budget) Collector() prometheus.Collector {
	labels := []string{"upstream", "account"}
	return &collector{
		b: b,
		limit: prometheus.NewDesc("shoal_budget_limit",
			"Counted upstream requests allowed per window (0: unknown or unlimited).", labels, nil),
		remaining: prometheus.NewDesc("shoal_budget_remaining",
			"Counted upstream requests remaining in the current window.", labels, nil),
		window: prometheus.NewDesc("shoal_budget_window_seconds",
			"Length of the upstream rate-limit window.", labels, nil),
		reserve: prometheus.NewDesc("shoal_budget_reserve",
			"Counted requests kept for cold pulls.", labels, nil),
		exhaustion: prometheus.NewDesc("shoal_budget_exhaustion_seconds",
			"Projected time until the budget is exhausted at the recent consumption rate (+Inf: not in sight).", labels, nil),
		throttled: prometheus.NewDesc("shoal_upstream_throttled_total",
			"429 Too Many Requests answers received from the upstream.", labels, nil),
	}
}

type collector struct {
	b                                                        *Budget
	limit, remaining, window, reserve, exhaustion, throttled *prometheus.Desc
}

func (c *collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.limit, c.remaining, c.window, c.reserve, c.exhaustion, c.throttled} {
		ch <- d
	}
}

func (c *collector) Collect(ch chan<- prometheus.Metric) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	sts, err := c.b.Snapshot(ctx)
	if err != nil {
		c.b.log.Warn("budget: metrics snapshot failed", "err", err)
		return
	}
	for _, s := range sts {
		lv := []string{s.Upstream, s.Account}
		exh := math.Inf(1)
		if s.ExhaustsIn >= 0 {
			exh = s.ExhaustsIn.Seconds()
		}
		ch <- prometheus.MustNewConstMetric(c.limit, prometheus.GaugeValue, float64(s.Limit), lv...)
		ch <- prometheus.MustNewConstMetric(c.remaining, prometheus.GaugeValue, float64(s.Remaining), lv...)
		ch <- prometheus.MustNewConstMetric(c.window, prometheus.GaugeValue, s.Window.Seconds(), lv...)
		ch <- prometheus.MustNewConstMetric(c.reserve, prometheus.GaugeValue, float64(s.Reserve), lv...)
		ch <- prometheus.MustNewConstMetric(c.exhaustion, prometheus.GaugeValue, exh, lv...)
		ch <- prometheus.MustNewConstMetric(c.throttled, prometheus.CounterValue, float64(s.Throttled), lv...)
	}
}
