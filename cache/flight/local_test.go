package flight_test

import (
	"bytes"
	"context"
	"io"
	"os"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/shoal-oci/shoal/cache/flight"
	"github.com/shoal-oci/shoal/cache/flight/flighttest"
)

func newLocal(t *testing.T, opts ...flight.Option) *flight.Local {
	t.Helper()
	l, err := flight.NewLocal(t.TempDir(), opts...)
	if err != nil {
		t.Fatal(err)
	}
	return l
}

func TestLocalConformance(t *testing.T) {
	flighttest.Conformance(t, func(t *testing.T) flighttest.Flight { return newLocal(t) })
}

func TestLocal(t *testing.T) {
	t.Run("metrics_count_fetches_joins_and_waiters", func(t *testing.T) {
		reg := prometheus.NewPedanticRegistry()
		l := newLocal(t, flight.WithRegisterer(reg))
		store, key := flighttest.NewStore(), "sha256:metrics"
		src := flighttest.Source(t, 4096)
		release := make(chan struct{})
		job := store.Job(key, func(ctx context.Context, w io.Writer) error {
			<-release
			_, err := w.Write(src)
			return err
		})
		var bodies []io.ReadCloser
		for range 3 {
			res, err := l.Do(t.Context(), key, job)
			if err != nil {
				t.Fatal(err)
			}
			bodies = append(bodies, res.Body)
		}
		if got := gauge(t, reg, "shoal_flight_waiters"); got != 3 {
			t.Errorf("waiters = %v while 3 callers read, want 3", got)
		}
		close(release)
		for _, b := range bodies {
			if _, err := io.ReadAll(b); err != nil {
				t.Fatal(err)
			}
			b.Close()
		}
		waitFor(t, func() bool { _, ok := store.Get(key); return ok })
		waitFor(t, func() bool { return gauge(t, reg, "shoal_flight_fetches_total") == 1 })
		if got := gauge(t, reg, "shoal_flight_deduplicated_total"); got != 2 {
			t.Errorf("deduplicated = %v, want 2", got)
		}
		if got := gauge(t, reg, "shoal_flight_waiters"); got != 0 {
			t.Errorf("waiters = %v after every body closed, want 0", got)
		}
		if got := labelled(t, reg, "shoal_flight_fetches_total", "result", "committed"); got != 1 {
			t.Errorf(`fetches_total{result="committed"} = %v, want 1`, got)
		}
	})

	t.Run("spool_is_removed_after_commit", func(t *testing.T) {
		dir := t.TempDir()
		l, err := flight.NewLocal(dir)
		if err != nil {
			t.Fatal(err)
		}
		store, key := flighttest.NewStore(), "sha256:spool"
		src := flighttest.Source(t, 8192)
		res, err := l.Do(t.Context(), key, store.Job(key, func(ctx context.Context, w io.Writer) error {
			_, err := w.Write(src)
			return err
		}))
		if err != nil {
			t.Fatal(err)
		}
		waitFor(t, func() bool { _, ok := store.Get(key); return ok })
		waitFor(t, func() bool { return len(entries(t, dir)) == 0 })
		// The open body still reads the unlinked spool.
		got, err := io.ReadAll(res.Body)
		res.Body.Close()
		if err != nil || !bytes.Equal(got, src) {
			t.Fatalf("read after unlink: %d bytes, err %v", len(got), err)
		}
	})

	t.Run("spool_is_removed_after_failed_fetch", func(t *testing.T) {
		dir := t.TempDir()
		l, err := flight.NewLocal(dir)
		if err != nil {
			t.Fatal(err)
		}
		store, key := flighttest.NewStore(), "sha256:fail"
		res, err := l.Do(t.Context(), key, store.Job(key, func(ctx context.Context, w io.Writer) error {
			_, _ = w.Write([]byte("partial"))
			return io.ErrUnexpectedEOF
		}))
		if err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadAll(res.Body); err == nil {
			t.Fatal("read of a failed fetch succeeded")
		}
		res.Body.Close()
		if n := len(entries(t, dir)); n != 0 {
			t.Fatalf("%d spool files left after the fetch failed", n)
		}
	})

	t.Run("commit_failure_is_forgotten_and_retried", func(t *testing.T) {
		l := newLocal(t)
		store, key := flighttest.NewStore(), "sha256:commitfail"
		src := flighttest.Source(t, 1024)
		var fetches int
		job := store.Job(key, func(ctx context.Context, w io.Writer) error {
			fetches++
			_, err := w.Write(src)
			return err
		})
		good := job.Commit
		committed := make(chan struct{})
		job.Commit = func(ctx context.Context, f *os.File) error {
			defer close(committed)
			return io.ErrClosedPipe
		}
		res, err := l.Do(t.Context(), key, job)
		if err != nil {
			t.Fatal(err)
		}
		if got, err := io.ReadAll(res.Body); err != nil || !bytes.Equal(got, src) {
			t.Fatalf("verified bytes should still stream when commit fails: %d bytes, err %v", len(got), err)
		}
		res.Body.Close()
		<-committed
		job.Commit = good
		waitFor(t, func() bool {
			res, err := l.Do(t.Context(), key, job)
			if err != nil {
				t.Fatal(err)
			}
			io.Copy(io.Discard, res.Body)
			res.Body.Close()
			_, ok := store.Get(key)
			return ok
		})
		if fetches < 2 {
			t.Fatalf("fetches = %d, want a new fetch after the failed commit", fetches)
		}
	})

	t.Run("job_without_fetch_is_refused", func(t *testing.T) {
		if _, err := newLocal(t).Do(t.Context(), "k", flight.Job{}); err == nil {
			t.Fatal("Do accepted a job with no Fetch")
		}
	})

	t.Run("cancelled_before_start_returns_ctx_error", func(t *testing.T) {
		l := newLocal(t)
		store, key := flighttest.NewStore(), "sha256:early"
		release := make(chan struct{})
		job := store.Job(key, func(ctx context.Context, w io.Writer) error {
			<-release
			_, err := w.Write([]byte("x"))
			return err
		})
		ctx, cancel := context.WithCancel(t.Context())
		cancel()
		res, err := l.Do(ctx, key, job)
		if err == nil {
			// Do may see the flight ready before ctx; the body must then
			// refuse to read.
			if _, err := res.Body.Read(make([]byte, 1)); err == nil {
				t.Error("read with a cancelled ctx succeeded")
			}
			res.Body.Close()
		}
		close(release)
		waitFor(t, func() bool { _, ok := store.Get(key); return ok })
	})
}

func gauge(t *testing.T, reg prometheus.Gatherer, name string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var sum float64
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			switch {
			case m.Counter != nil:
				sum += m.Counter.GetValue()
			case m.Gauge != nil:
				sum += m.Gauge.GetValue()
			}
		}
	}
	return sum
}

func labelled(t *testing.T, reg prometheus.Gatherer, name, label, value string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, lp := range m.GetLabel() {
				if lp.GetName() == label && lp.GetValue() == value {
					return m.GetCounter().GetValue()
				}
			}
		}
	}
	return 0
}

func entries(t *testing.T, dir string) []os.DirEntry {
	t.Helper()
	es, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	return es
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not met within 5s")
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestSizeIsAnnouncedBeforeTheFirstByte(t *testing.T) {
	l, err := flight.NewLocal(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	release := make(chan struct{})
	job := flight.Job{
		Fetch: func(ctx context.Context, w io.Writer) error {
			w.(interface{ SetSize(int64) }).SetSize(42)
			<-release
			_, err := w.Write(make([]byte, 42))
			return err
		},
		Commit: func(context.Context, *os.File) error { return nil },
	}
	res, err := l.Do(context.Background(), "k", job)
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	n, err := res.Body.(interface {
		Size(context.Context) (int64, error)
	}).Size(ctx)
	if err != nil || n != 42 {
		t.Fatalf("Size = %d, %v; want 42 before any byte was written", n, err)
	}
	close(release)
	b, err := io.ReadAll(res.Body)
	if err != nil || len(b) != 42 {
		t.Fatalf("read %d bytes, %v", len(b), err)
	}
}
