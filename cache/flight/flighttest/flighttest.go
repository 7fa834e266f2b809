// Package flighttest holds the behaviour every flight implementation must
// show, as one suite (Conformance), and an in-memory Store to commit into.
package flighttest

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/shoal-oci/shoal/cache/flight"
)

// Flight is the interface under test; the cache tier consumes the same one.
type Flight interface {
	Do(ctx context.Context, key string, job flight.Job) (flight.Result, error)
}

// Store is a fake shared storage: committed blobs by key.
type Store struct {
	mu      sync.Mutex
	blobs   map[string][]byte
	commits map[string]int
}

// NewStore returns an empty Store.
func NewStore() *Store {
	return &Store{blobs: make(map[string][]byte), commits: make(map[string]int)}
}

// Job returns a job for key that fetches with fetch and commits into s.
func (s *Store) Job(key string, fetch func(ctx context.Context, w io.Writer) error) flight.Job {
	return flight.Job{
		Fetch: fetch,
		Commit: func(_ context.Context, f *os.File) error {
			b, err := io.ReadAll(f)
			if err != nil {
				return fmt.Errorf("read spool: %w", err)
			}
			s.mu.Lock()
			defer s.mu.Unlock()
			s.blobs[key] = b
			s.commits[key]++
			return nil
		},
		Committed: func(context.Context) (bool, error) {
			_, ok := s.Get(key)
			return ok, nil
		},
	}
}

// Get returns the committed bytes of key.
func (s *Store) Get(key string) ([]byte, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	b, ok := s.blobs[key]
	return b, ok
}

// Commits returns how many times key was committed.
func (s *Store) Commits(key string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.commits[key]
}

// Source returns n random bytes.
func Source(t testing.TB, n int) []byte {
	t.Helper()
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return b
}

// Conformance runs the shared suite. newFlight returns a fresh flight for
// each subtest.
func Conformance(t *testing.T, newFlight func(t *testing.T) Flight) {
	t.Run("concurrent_callers_share_one_fetch", func(t *testing.T) {
		f, store, key := newFlight(t), NewStore(), "sha256:dedup"
		src := Source(t, 64<<10)
		release := make(chan struct{})
		var fetches atomic.Int32
		job := store.Job(key, func(ctx context.Context, w io.Writer) error {
			fetches.Add(1)
			<-release
			return writeChunks(w, src, 4<<10)
		})
		const n = 32
		var started, done sync.WaitGroup
		started.Add(n)
		done.Add(n)
		got := make([][]byte, n)
		errs := make([]error, n)
		var leaders atomic.Int32
		for i := range n {
			go func() {
				defer done.Done()
				res, err := f.Do(t.Context(), key, job)
				started.Done()
				if err != nil {
					errs[i] = err
					return
				}
				if res.Leader {
					leaders.Add(1)
				}
				defer res.Body.Close()
				got[i], errs[i] = io.ReadAll(res.Body)
			}()
		}
		all := make(chan struct{})
		go func() { started.Wait(); close(all) }()
		select {
		case <-all:
		case <-time.After(10 * time.Second):
			close(release)
			t.Fatal("not every caller joined the flight within 10s")
		}
		close(release)
		done.Wait()
		for i := range n {
			if errs[i] != nil {
				t.Fatalf("caller %d: %v", i, errs[i])
			}
			if !bytes.Equal(got[i], src) {
				t.Fatalf("caller %d read %d bytes that differ from the %d-byte source", i, len(got[i]), len(src))
			}
		}
		if n := fetches.Load(); n != 1 {
			t.Errorf("Fetch ran %d times, want 1", n)
		}
		if n := leaders.Load(); n != 1 {
			t.Errorf("%d leaders, want 1", n)
		}
		waitCommitted(t, store, key, src)
	})

	t.Run("readers_stream_before_fetch_completes", func(t *testing.T) {
		f, store, key := newFlight(t), NewStore(), "sha256:stream"
		src := Source(t, 64<<10)
		release := make(chan struct{})
		job := store.Job(key, gated(src, release, nil))
		res, err := f.Do(t.Context(), key, job)
		if err != nil {
			close(release)
			t.Fatal(err)
		}
		defer res.Body.Close()
		first := make([]byte, 1024)
		readErr := make(chan error, 1)
		go func() { _, err := io.ReadFull(res.Body, first); readErr <- err }()
		select {
		case err := <-readErr:
			if err != nil {
				close(release)
				t.Fatalf("first KiB: %v", err)
			}
		case <-time.After(5 * time.Second):
			close(release)
			t.Fatal("first KiB did not arrive while the fetch was still running")
		}
		close(release)
		rest, err := io.ReadAll(res.Body)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(append(first, rest...), src) {
			t.Fatal("streamed bytes differ from the source")
		}
		waitCommitted(t, store, key, src)
	})

	t.Run("fetch_error_reaches_readers_and_skips_commit", func(t *testing.T) {
		f, store, key := newFlight(t), NewStore(), "sha256:broken"
		src := Source(t, 8<<10)
		boom := errors.New("digest mismatch")
		release := make(chan struct{})
		job := store.Job(key, gated(src, release, boom))
		var bodies []io.ReadCloser
		for range 2 {
			res, err := f.Do(t.Context(), key, job)
			if err != nil {
				t.Fatal(err)
			}
			defer res.Body.Close()
			bodies = append(bodies, res.Body)
		}
		close(release)
		for i, b := range bodies {
			got, err := io.ReadAll(b)
			if !errors.Is(err, boom) {
				t.Errorf("reader %d: err = %v after %d bytes, want the fetch error", i, err, len(got))
			}
			if !bytes.Equal(got, src[:len(got)]) {
				t.Errorf("reader %d read bytes that differ from the source", i)
			}
		}
		if n := store.Commits(key); n != 0 {
			t.Errorf("Commit ran %d times after a failed fetch, want 0", n)
		}
		// The failed flight is forgotten: the next caller fetches again.
		res, err := f.Do(t.Context(), key, store.Job(key, func(ctx context.Context, w io.Writer) error {
			_, err := w.Write(src)
			return err
		}))
		if err != nil {
			t.Fatal(err)
		}
		defer res.Body.Close()
		if got, err := io.ReadAll(res.Body); err != nil || !bytes.Equal(got, src) {
			t.Fatalf("retry after failure: %d bytes, err %v", len(got), err)
		}
		waitCommitted(t, store, key, src)
	})

	t.Run("cancelled_caller_does_not_break_others", func(t *testing.T) {
		f, store, key := newFlight(t), NewStore(), "sha256:cancel"
		src := Source(t, 32<<10)
		release := make(chan struct{})
		job := store.Job(key, gated(src, release, nil))
		ctxA, cancelA := context.WithCancel(t.Context())
		a, err := f.Do(ctxA, key, job)
		if err != nil {
			close(release)
			t.Fatal(err)
		}
		defer a.Body.Close()
		b, err := f.Do(t.Context(), key, job)
		if err != nil {
			close(release)
			t.Fatal(err)
		}
		defer b.Body.Close()
		if !a.Leader || b.Leader {
			t.Errorf("leaders: first %v, second %v; want the first only", a.Leader, b.Leader)
		}
		if _, err := io.ReadFull(a.Body, make([]byte, 1024)); err != nil {
			close(release)
			t.Fatal(err)
		}
		cancelA()
		if _, err := a.Body.Read(make([]byte, 1)); !errors.Is(err, context.Canceled) {
			t.Errorf("cancelled reader: err = %v, want context.Canceled", err)
		}
		close(release)
		got, err := io.ReadAll(b.Body)
		if err != nil || !bytes.Equal(got, src) {
			t.Fatalf("other reader: %d bytes, err %v; want the whole source", len(got), err)
		}
		waitCommitted(t, store, key, src)
	})

	t.Run("fetch_completes_after_every_reader_left", func(t *testing.T) {
		f, store, key := newFlight(t), NewStore(), "sha256:abandoned"
		src := Source(t, 16<<10)
		release := make(chan struct{})
		job := store.Job(key, func(ctx context.Context, w io.Writer) error {
			<-release
			_, err := w.Write(src)
			return err
		})
		ctx, cancel := context.WithCancel(t.Context())
		res, err := f.Do(ctx, key, job)
		if err != nil {
			close(release)
			t.Fatal(err)
		}
		res.Body.Close()
		cancel()
		close(release)
		waitCommitted(t, store, key, src)
	})
}

// gated is a fetch that writes the first KiB of src, waits for release, and
// then writes the rest, or fails with fail if it is not nil.
func gated(src []byte, release <-chan struct{}, fail error) func(context.Context, io.Writer) error {
	return func(ctx context.Context, w io.Writer) error {
		if _, err := w.Write(src[:1024]); err != nil {
			return err
		}
		<-release
		if fail != nil {
			return fail
		}
		_, err := w.Write(src[1024:])
		return err
	}
}

func writeChunks(w io.Writer, b []byte, size int) error {
	for len(b) > 0 {
		n := min(size, len(b))
		if _, err := w.Write(b[:n]); err != nil {
			return err
		}
		b = b[n:]
	}
	return nil
}

// waitCommitted waits for the flight to commit want under key, exactly once.
func waitCommitted(t *testing.T, s *Store, key string, want []byte) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		if got, ok := s.Get(key); ok {
			if !bytes.Equal(got, want) {
				t.Fatalf("committed %d bytes that differ from the %d-byte source", len(got), len(want))
			}
			if n := s.Commits(key); n != 1 {
				t.Fatalf("committed %d times, want 1", n)
			}
			return
		}
		if time.Now().After(deadline) {
			t.Fatal("content was never committed")
		}
		time.Sleep(5 * time.Millisecond)
	}
}
