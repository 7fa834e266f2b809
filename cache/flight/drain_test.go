package flight_test

import (
	"context"
	"io"
	"os"
	"testing"
	"time"

	"github.com/shoal-oci/shoal/cache/flight"
)

// TestDrainWaitsForCommitAfterTheLastByte: a caller reads the whole body
// before the commit runs; Drain returns only once the commit is done, and
// gives up with an error when its context ends first.
func TestDrainWaitsForCommitAfterTheLastByte(t *testing.T) {
	l := newLocal(t)
	commitGo, committed := make(chan struct{}), make(chan struct{})
	job := flight.Job{
		Fetch: func(ctx context.Context, w io.Writer) error {
			_, err := w.Write([]byte("hello"))
			return err
		},
		Commit: func(ctx context.Context, f *os.File) error {
			<-commitGo
			close(committed)
			return nil
		},
		Committed: func(ctx context.Context) (bool, error) { return false, nil },
	}
	res, err := l.Do(context.Background(), "k", job)
	if err != nil {
		t.Fatal(err)
	}
	b, err := io.ReadAll(res.Body)
	res.Body.Close()
	if err != nil || string(b) != "hello" {
		t.Fatalf("body %q, %v", b, err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	if err := l.Drain(ctx); err == nil {
		t.Fatal("Drain returned while the commit was still running")
	}
	close(commitGo)
	if err := l.Drain(context.Background()); err != nil {
		t.Fatal(err)
	}
	select {
	case <-committed:
	default:
		t.Fatal("Drain returned before the commit finished")
	}
}
