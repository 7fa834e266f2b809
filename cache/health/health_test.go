package health_test

import (
	"context"
	"errors"
	"sync/atomic"
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/shoal-oci/shoal/cache/health"
)

func TestWatcherTracksTransitions(t *testing.T) {
	var down atomic.Bool
	reg := prometheus.NewRegistry()
	w, err := health.New("redis", func(context.Context) error {
		if down.Load() {
			return errors.New("connection refused")
		}
		return nil
	}, 0, nil, reg)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	w.Check(ctx)
	if !w.Up() {
		t.Fatal("up before any failure")
	}
	down.Store(true)
	w.Check(ctx)
	w.Check(ctx)
	if w.Up() {
		t.Fatal("still up after a failed probe")
	}
	down.Store(false)
	w.Check(ctx)
	if !w.Up() {
		t.Fatal("not up after a good probe")
	}
	w.Report(context.Canceled)
	if !w.Up() {
		t.Fatal("a caller's cancellation marked the dependency down")
	}
	w.Report(errors.New("i/o timeout"))
	if w.Up() {
		t.Fatal("a reported failure did not mark it down")
	}
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]float64{}
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			key := mf.GetName()
			for _, l := range m.GetLabel() {
				if l.GetName() == "to" {
					key += "/" + l.GetValue()
				}
			}
			if c := m.GetCounter(); c != nil {
				got[key] = c.GetValue()
			} else if g := m.GetGauge(); g != nil {
				got[key] = g.GetValue()
			}
		}
	}
	want := map[string]float64{
		"shoal_dependency_up": 0, "shoal_dependency_transitions_total/degraded": 2, "shoal_dependency_transitions_total/recovered": 1,
	}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("%s = %v, want %v (all: %v)", k, got[k], v, got)
		}
	}
	var nilW *health.Watcher
	if !nilW.Up() {
		t.Error("a nil Watcher must count as up")
	}
}
