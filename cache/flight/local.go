package flight

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"time"
)

// Local is an in-process flight: at most one fetch per key at a time, shared
// by every caller that asks while it runs. The fetch runs detached from the
// callers' contexts, so it survives any of them leaving; it is forgotten as
// soon as it is committed or has failed.
type Local struct {
	dir string
	cfg config
	m   *metrics

	mu      sync.Mutex
	calls   map[string]*call
	running int // flights started and not yet committed or failed
}

// A gate runs in the flight before Fetch. The Redis flight uses it to take
// the cross-replica lease, or to wait for another replica to commit
// (elsewhere), or to relay from the replica that holds the lease.
type gate func(ctx context.Context, relay bool) (gateResult, error)

// gateResult is a gate's verdict.
type gateResult struct {
	// elsewhere: another replica committed the content.
	elsewhere bool
	// relayFrom: stream from this replica, which holds the lease.
	relayFrom string
	// release, if not nil, runs after Commit or a failed Fetch.
	release func()
}

// call is one flight. ready is closed once the flight streams, turned out to
// be elsewhere, or failed to start; the fields above mu are set before then.
type call struct {
	ready     chan struct{}
	elsewhere bool
	startErr  error

	mu   sync.Mutex
	file *os.File
	old  []*os.File // spools replaced by restart, closed with the last reference
	size int64
	// total is the size Fetch announced with SetSize, -1 until then.
	total int64
	done  bool
	err   error
	wake  chan struct{} // closed and replaced whenever size or done changes
	// nospace: the announced size does not fit the disk; writes fail.
	nospace bool
	refs    int // attached callers, plus one for the running flight
}

// NewLocal returns a Local that spools fetches into files under spoolDir,
// creating it if needed. Options: WithLogger, WithRegisterer, WithTimeout.
func NewLocal(spoolDir string, opts ...Option) (*Local, error) {
	cfg := newConfig(opts)
	if err := os.MkdirAll(spoolDir, 0o700); err != nil {
		return nil, fmt.Errorf("flight spool dir: %w", err)
	}
	// A process that died mid-fetch or mid-commit (SIGKILL, OOM) left its
	// spool files behind; nothing else writes here, so they are garbage.
	if left, err := filepath.Glob(filepath.Join(spoolDir, "flight-*")); err == nil {
		for _, p := range left {
			if err := os.Remove(p); err == nil {
				cfg.log.Info("removed a spool file left by an earlier process", "path", p)
			}
		}
	}
	m, err := newMetrics(cfg.reg)
	if err != nil {
		return nil, err
	}
	return &Local{dir: spoolDir, cfg: cfg, m: m, calls: make(map[string]*call)}, nil
}

// Do joins the flight for key, starting it with job if none is running. It
// returns once the flight streams; the Body then follows the fetch as it
// writes. ctx bounds this caller's wait and reads, never the fetch.
func (l *Local) Do(ctx context.Context, key string, job Job) (Result, error) {
	return l.do(ctx, key, job, nil)
}

func (l *Local) do(ctx context.Context, key string, job Job, g gate) (Result, error) {
	if job.Fetch == nil || job.Commit == nil {
		return Result{}, errors.New("flight: job needs Fetch and Commit")
	}
	l.mu.Lock()
	c, joined := l.calls[key]
	if !joined {
		c = &call{ready: make(chan struct{}), wake: make(chan struct{}), refs: 1, total: -1}
		l.calls[key] = c
		l.running++
	}
	c.mu.Lock()
	c.refs++
	c.mu.Unlock()
	l.mu.Unlock()
	l.m.waiters.Inc()
	if joined {
		l.m.dedup.Inc()
	} else {
		go l.run(context.WithoutCancel(ctx), key, c, job, g)
	}

	select {
	case <-c.ready:
	case <-ctx.Done():
		l.leave(c)
		return Result{}, fmt.Errorf("flight %s: %w", key, ctx.Err())
	}
	switch {
	case c.startErr != nil:
		l.leave(c)
		return Result{}, c.startErr
	case c.elsewhere:
		l.leave(c)
		return Result{Elsewhere: true}, nil
	}
	return Result{Body: &body{l: l, c: c, ctx: ctx}, Leader: !joined}, nil
}

// run is the flight: gate, spool, Fetch, Commit, forget.
func (l *Local) run(ctx context.Context, key string, c *call, job Job, g gate) {
	ctx, cancel := context.WithTimeout(ctx, l.cfg.timeout)
	defer cancel()
	defer c.unref()
	defer func() {
		l.mu.Lock()
		l.running--
		l.mu.Unlock()
	}()
	log := l.cfg.log.With("key", key)

	f, err := os.CreateTemp(l.dir, "flight-*")
	if err != nil {
		c.startErr = fmt.Errorf("flight %s: spool: %w", key, err)
		l.forget(key, c)
		close(c.ready)
		return
	}
	c.mu.Lock()
	c.file = f
	c.mu.Unlock()

	release := func() {}
	fetch := job.Fetch
	if g != nil {
		res, err := g(ctx, job.Relay != nil)
		if res.relayFrom != "" {
			close(c.ready)
			l.m.relayed.Inc()
			rerr := job.Relay(ctx, spool{c, l.dir}, res.relayFrom)
			if rerr == nil {
				// The holder commits; this replica only passed the bytes on.
				c.finish(nil)
				l.unlink(f.Name())
				l.forget(key, c)
				return
			}
			// The holder failed (died, stalled): wait on its lease as a
			// replica without relay would, and on takeover fetch afresh into
			// a new spool. Readers keep their offsets: the content is the
			// same bytes, so they go on once the new spool passes them.
			log.Info("flight relay failed; waiting on the lease", "from", res.relayFrom, "relayed", c.written(), "err", rerr)
			res, err = g(ctx, false)
			if err == nil && !res.elsewhere {
				nf, cerr := os.CreateTemp(l.dir, "flight-*")
				if cerr != nil {
					err = fmt.Errorf("flight %s: spool: %w", key, cerr)
				} else {
					l.unlink(f.Name())
					c.restart(nf)
					f = nf
				}
			}
			if err == nil && res.elsewhere {
				err = errElsewhereLate
			}
		}
		if err != nil || res.elsewhere {
			if res.elsewhere {
				l.m.dedup.Inc()
			}
			l.unlink(f.Name())
			l.forget(key, c)
			if isClosed(c.ready) {
				c.finish(err)
				return
			}
			c.elsewhere, c.startErr = res.elsewhere, err
			close(c.ready)
			return
		}
		if res.release != nil {
			release = res.release
		}
	}
	if !isClosed(c.ready) {
		close(c.ready)
	}

	if err := fetch(ctx, spool{c, l.dir}); err != nil {
		// Forget before readers see the error, so that a caller who retries
		// starts a new flight rather than joining this failed one.
		err = fmt.Errorf("flight %s: fetch: %w", key, err)
		log.Warn("flight fetch failed", "err", err)
		l.m.fetches.WithLabelValues("fetch_error").Inc()
		l.unlink(f.Name())
		release()
		l.forget(key, c)
		c.finish(err)
		return
	}
	c.finish(nil)
	result := "committed"
	if err := commit(ctx, f.Name(), job); err != nil {
		result = "commit_error"
		log.Warn("flight commit failed", "err", err)
	}
	l.m.fetches.WithLabelValues(result).Inc()
	l.unlink(f.Name())
	release()
	l.forget(key, c)
}

// errElsewhereLate fails readers that joined a relay which then gave way
// to another replica's commit: they retry, and find the content stored.
var errElsewhereLate = errors.New("flight: content committed by another replica; retry")

func isClosed(ch chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}

// restart replaces the spool with an empty file f for a fetch that starts
// over; readers stay where they are and wait for the new spool to reach them.
func (c *call) restart(f *os.File) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.old = append(c.old, c.file)
	c.file, c.size = f, 0
}

// written is how many bytes the spool holds.
func (c *call) written() int64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.size
}

// Drain waits until every running flight has committed or failed, or ctx
// ends. A client gets its last byte before the commit, so a process that
// exits without draining can lose content its clients already received.
func (l *Local) Drain(ctx context.Context) error {
	t := time.NewTicker(20 * time.Millisecond)
	defer t.Stop()
	for {
		l.mu.Lock()
		n := l.running
		l.mu.Unlock()
		if n == 0 {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("flight: %d fetches still running: %w", n, ctx.Err())
		case <-t.C:
		}
	}
}

func (l *Local) unlink(path string) {
	if err := os.Remove(path); err != nil {
		l.cfg.log.Warn("flight spool unlink", "path", path, "err", err)
	}
}

// commit hands Job.Commit a file of its own, positioned at 0.
func commit(ctx context.Context, path string, job Job) error {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("open spool: %w", err)
	}
	defer f.Close()
	if err := job.Commit(ctx, f); err != nil {
		return fmt.Errorf("commit: %w", err)
	}
	return nil
}

func (l *Local) forget(key string, c *call) {
	l.mu.Lock()
	if l.calls[key] == c {
		delete(l.calls, key)
	}
	l.mu.Unlock()
}

// leave detaches a caller.
func (l *Local) leave(c *call) {
	l.m.waiters.Dec()
	c.unref()
}

// unref drops one reference; the last one closes the (already unlinked) spool.
func (c *call) unref() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.refs--
	if c.refs == 0 && c.file != nil {
		for _, o := range c.old {
			_ = o.Close()
		}
		_ = c.file.Close()
	}
}

// finish ends the fetch and wakes every reader.
func (c *call) finish(err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.done, c.err = true, err
	close(c.wake)
}

var errFinished = errors.New("flight: write after fetch returned")

// ErrNoSpace fails a flight whose content does not fit the spool's disk.
// It comes before the first byte when the size is announced (SetSize), so a
// caller can still serve the content another way (straight from upstream).
var ErrNoSpace = errors.New("flight: no space left for the spool")

// spoolMargin is the free space a spool must leave on its disk.
const spoolMargin = 64 << 20

// hasSpace reports whether n more bytes fit in dir: the spool and, when
// storage shares the disk, the committed copy (2n), plus a margin.
func hasSpace(dir string, n int64) bool {
	var st syscall.Statfs_t
	if err := syscall.Statfs(dir, &st); err != nil {
		return true // cannot tell: let the writes decide
	}
	free := int64(st.Bavail) * int64(st.Bsize)
	return free >= 2*n+spoolMargin
}

// spool is the io.Writer that Fetch writes into.
type spool struct {
	c   *call
	dir string
}

func (s spool) Write(p []byte) (int, error) {
	c := s.c
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.done {
		return 0, errFinished
	}
	if c.nospace {
		return 0, ErrNoSpace
	}
	n, err := c.file.Write(p)
	if n > 0 {
		c.size += int64(n)
		close(c.wake)
		c.wake = make(chan struct{})
	}
	if errors.Is(err, syscall.ENOSPC) {
		return n, fmt.Errorf("write spool: %w: %w", ErrNoSpace, err)
	}
	if err != nil {
		return n, fmt.Errorf("write spool: %w", err)
	}
	return n, nil
}

// SetSize announces the content's total size before its first byte, so that
// every reader can learn it (Body's Size) without waiting for the end.
// Fetch reaches it through its io.Writer.
func (s spool) SetSize(n int64) {
	c := s.c
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.done || c.total >= 0 {
		return
	}
	if n > 0 && c.size == 0 && !hasSpace(s.dir, n) {
		// Say nothing of the size: readers then learn of ErrNoSpace before
		// any header goes out.
		c.nospace = true
		return
	}
	c.total = n
	close(c.wake)
	c.wake = make(chan struct{})
}

// body reads the spool from 0, waiting at its end for the fetch.
type body struct {
	l      *Local
	c      *call
	ctx    context.Context
	off    int64
	closed bool
}

func (b *body) Read(p []byte) (int, error) {
	if b.closed {
		return 0, os.ErrClosed
	}
	if len(p) == 0 {
		return 0, nil
	}
	c := b.c
	for {
		if err := b.ctx.Err(); err != nil {
			return 0, fmt.Errorf("flight: %w", err)
		}
		c.mu.Lock()
		size, done, ferr, wake, file := c.size, c.done, c.err, c.wake, c.file
		c.mu.Unlock()
		if b.off < size {
			p = p[:min(int64(len(p)), size-b.off)]
			n, err := file.ReadAt(p, b.off)
			b.off += int64(n)
			if n > 0 {
				return n, nil
			}
			return 0, fmt.Errorf("flight: read spool: %w", err)
		}
		if done {
			if ferr != nil {
				return 0, ferr
			}
			return 0, io.EOF
		}
		select {
		case <-wake:
		case <-b.ctx.Done():
		}
	}
}

// Size returns the total size the fetch announced with SetSize. It waits for
// the announcement, the first byte or the end of the fetch, whichever comes
// first; it returns -1 if bytes arrive with no size announced, and the
// fetch's error if it fails before either.
func (b *body) Size(ctx context.Context) (int64, error) { return b.size(ctx, false) }

// FinalSize is Size, except that when no size was announced it waits for
// the end of the fetch and returns the number of bytes fetched.
func (b *body) FinalSize(ctx context.Context) (int64, error) { return b.size(ctx, true) }

func (b *body) size(ctx context.Context, toEnd bool) (int64, error) {
	c := b.c
	for {
		c.mu.Lock()
		total, size, done, ferr, wake := c.total, c.size, c.done, c.err, c.wake
		c.mu.Unlock()
		switch {
		case total >= 0:
			return total, nil
		case done && ferr != nil:
			return 0, ferr
		case done:
			return size, nil
		case size > 0 && !toEnd:
			return -1, nil
		}
		select {
		case <-wake:
		case <-ctx.Done():
			return 0, fmt.Errorf("flight: %w", ctx.Err())
		case <-b.ctx.Done():
			return 0, fmt.Errorf("flight: %w", b.ctx.Err())
		}
	}
}

func (b *body) Close() error {
	if !b.closed {
		b.closed = true
		b.l.leave(b.c)
	}
	return nil
}
