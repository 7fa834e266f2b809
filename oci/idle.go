package oci

import (
	"errors"
	"fmt"
	"io"
	"sync/atomic"
	"time"
)

// ErrStalled is returned by an IdleReader whose source sent nothing for
// longer than its idle timeout.
var ErrStalled = errors.New("source stalled: no bytes within the idle timeout")

// IdleReader is a body that fails with ErrStalled when a single Read waits
// longer than its timeout: a hop that sends headers and then nothing must
// not hold a pull (and every waiter behind it) for good. When the timer
// fires it closes the underlying body, which unblocks the Read.
type IdleReader struct {
	rc      io.ReadCloser
	timeout time.Duration
	timer   *time.Timer
	fired   atomic.Bool
}

// NewIdleReader wraps rc. A timeout <= 0 returns rc's reads untimed.
func NewIdleReader(rc io.ReadCloser, timeout time.Duration) *IdleReader {
	ir := &IdleReader{rc: rc, timeout: timeout}
	if timeout > 0 {
		ir.timer = time.AfterFunc(time.Hour, func() {
			ir.fired.Store(true)
			_ = rc.Close()
		})
		ir.timer.Stop()
	}
	return ir
}

// Read implements io.Reader.
func (r *IdleReader) Read(p []byte) (int, error) {
	if r.timer == nil {
		return r.rc.Read(p)
	}
	if r.fired.Load() {
		return 0, fmt.Errorf("%w (%s)", ErrStalled, r.timeout)
	}
	r.timer.Reset(r.timeout)
	n, err := r.rc.Read(p)
	r.timer.Stop()
	if err != nil && r.fired.Load() {
		return n, fmt.Errorf("%w (%s)", ErrStalled, r.timeout)
	}
	return n, err
}

// Close implements io.Closer.
func (r *IdleReader) Close() error {
	if r.timer != nil {
		r.timer.Stop()
	}
	return r.rc.Close()
}
