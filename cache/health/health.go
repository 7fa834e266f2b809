// Package health watches one dependency of the cache tier (Redis) and says
// whether it is reachable right now. While it is not, the callers that
// consult it (the flight's lease, the budget's state) go straight to their
// in-process fallback instead of waiting on timeouts for every request; the
// replica stays ready and keeps serving. Each transition is logged and
// counted.
package health

import (
	"context"
	"errors"
	"log/slog"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Probe checks the dependency once; it must honour ctx.
type Probe func(ctx context.Context) error

// Watcher tracks one dependency. Its zero value is not usable; use Watch.
type Watcher struct {
	name     string
	probe    Probe
	interval time.Duration
	timeout  time.Duration
	log      *slog.Logger
	up       atomic.Bool
	gauge    prometheus.Gauge
	changes  *prometheus.CounterVec
}

// New returns a Watcher for the dependency called name, assumed up until a
// probe says otherwise. It registers shoal_dependency_up{dependency} and
// shoal_dependency_transitions_total{dependency,to} on reg (nil: none).
// Start it with Run.
func New(name string, probe Probe, interval time.Duration, log *slog.Logger, reg prometheus.Registerer) (*Watcher, error) {
	if interval <= 0 {
		interval = time.Second
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	w := &Watcher{
		name: name, probe: probe, interval: interval, timeout: min(interval, time.Second), log: log,
		gauge: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "shoal_dependency_up", Help: "1 while the dependency answers its probe; 0 while the replica runs degraded without it.",
			ConstLabels: prometheus.Labels{"dependency": name},
		}),
		changes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "shoal_dependency_transitions_total", Help: "Times the dependency went away (to=degraded) or came back (to=recovered).",
			ConstLabels: prometheus.Labels{"dependency": name},
		}, []string{"to"}),
	}
	w.up.Store(true)
	w.gauge.Set(1)
	w.changes.WithLabelValues("degraded")
	w.changes.WithLabelValues("recovered")
	if reg != nil {
		for _, c := range []prometheus.Collector{w.gauge, w.changes} {
			if err := reg.Register(c); err != nil {
				return nil, err
			}
		}
	}
	return w, nil
}

// Up reports whether the last probe succeeded. A nil Watcher is always up.
func (w *Watcher) Up() bool { return w == nil || w.up.Load() }

// Check probes once now and records the outcome.
func (w *Watcher) Check(ctx context.Context) {
	pctx, cancel := context.WithTimeout(ctx, w.timeout)
	err := w.probe(pctx)
	cancel()
	if ctx.Err() != nil {
		return
	}
	w.set(err)
}

func (w *Watcher) set(err error) {
	up := err == nil
	if w.up.Swap(up) == up {
		return
	}
	if up {
		w.gauge.Set(1)
		w.changes.WithLabelValues("recovered").Inc()
		w.log.Info("dependency reachable again; shared state resumes", "dependency", w.name)
		return
	}
	w.gauge.Set(0)
	w.changes.WithLabelValues("degraded").Inc()
	w.log.Warn("dependency unreachable; running degraded on in-process state (still serving)", "dependency", w.name, "err", err)
}

// Report records a failure a caller saw, so the next callers skip the
// dependency at once instead of each waiting for its own timeout. The next
// successful probe clears it.
func (w *Watcher) Report(err error) {
	if w != nil && err != nil && !errors.Is(err, context.Canceled) {
		w.set(err)
	}
}

// Run probes every interval until ctx ends.
func (w *Watcher) Run(ctx context.Context) {
	t := time.NewTicker(w.interval)
	defer t.Stop()
	for {
		w.Check(ctx)
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}
