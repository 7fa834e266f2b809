package node

import (
	"context"
	"errors"
	"fmt"
	"hash"
	"io"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/shoal-oci/shoal/oci"
)

// Striping: a large blob that several peers hold is fetched as parallel
// ranges (segments of StripeChunk bytes), one worker per peer, and written
// to the client in order as each segment completes. A worker takes the next
// segment within a window ahead of the writer; a worker whose peer fails
// drops out and its segment goes back to the others; when the writer has
// waited on one segment for longer than its peers take for a segment, an
// idle worker fetches that segment too and the first copy wins (so a slow
// peer's share moves to the fast ones). When every peer worker has failed,
// the resume targets (the cache tier) take over the rest. Memory is bounded
// by the window: at most window segments are buffered per transfer.

// shouldStripe says whether a blob answer of span s, from a request with
// range header rng, is striped across the other peers in rest.
func (n *Node) shouldStripe(r *http.Request, s span, rest []target) bool {
	if n.cfg.StripeMaxPeers < 2 || r.Method != http.MethodGet || s.end-s.start+1 < n.cfg.StripeMinSize {
		return false
	}
	// An open-ended range ("bytes=N-") is how containerd's chunked fetch
	// asks for each chunk: it reads its chunk and hangs up, so fetching
	// ahead would be waste. Those requests spread over the holders one by
	// one instead (the picker sends each to the least busy).
	if rng := r.Header.Get("Range"); rng != "" && strings.HasSuffix(strings.TrimSpace(rng), "-") {
		return false
	}
	for _, t := range rest {
		if t.peer != nil && !t.receiving {
			return true
		}
	}
	return false
}

// segment is one range of a striped blob.
type segment struct {
	start, end int64 // inclusive, absolute offsets in the blob
	buf        []byte
	done       bool
	owners     int       // workers fetching it now
	since      time.Time // when its first fetch began
}

func (g *segment) size() int64 { return g.end - g.start + 1 }

// stripe is the shared state of one striped transfer.
type stripe struct {
	mu      sync.Mutex
	cond    *sync.Cond
	segs    []*segment
	next    int // first segment never handed out
	written int // segments written to the client
	window  int
	workers int           // workers alive
	took    time.Duration // sum of completed segment fetch times
	fetched int           // completed fetches
	stall   time.Duration // floor for "the writer waits too long"
	over    bool          // the transfer ended (done, failed or the client left)
}

func newStripe(s span, chunk int64, window int, stall time.Duration) *stripe {
	st := &stripe{window: window, stall: stall}
	st.cond = sync.NewCond(&st.mu)
	for off := s.start; off <= s.end; off += chunk {
		st.segs = append(st.segs, &segment{start: off, end: min(off+chunk-1, s.end)})
	}
	return st
}

// take hands worker a segment to fetch: the next one within the window,
// or, when there is none, the segment the writer is waiting on if it has
// been in flight too long (and this worker is not already on it). It
// blocks until there is one, and returns nil when the transfer is over.
func (st *stripe) take(mine map[*segment]bool) *segment {
	st.mu.Lock()
	defer st.mu.Unlock()
	for {
		if st.over || st.written == len(st.segs) {
			return nil
		}
		for st.next < len(st.segs) && st.segs[st.next].done {
			st.next++
		}
		if st.next < len(st.segs) && st.next < st.written+st.window {
			g := st.segs[st.next]
			st.next++
			if g.owners == 0 && !g.done {
				g.owners++
				g.since = time.Now()
				return g
			}
			continue
		}
		// Nothing new to hand out: help with the segment holding the
		// writer up, if it is overdue.
		if g := st.segs[st.written]; !g.done && !mine[g] && (g.owners == 0 || time.Since(g.since) > st.overdue()) {
			if g.owners == 0 {
				g.since = time.Now()
			}
			g.owners++
			return g
		}
		st.cond.Wait()
	}
}

// overdue is how long a segment may take before an idle worker fetches it
// too: twice the mean of the segments done so far, and at least st.stall.
func (st *stripe) overdue() time.Duration {
	if st.fetched == 0 {
		return 4 * st.stall
	}
	return max(2*st.took/time.Duration(st.fetched), st.stall)
}

// complete stores g's bytes; the first copy wins. It returns whether buf
// was kept (false: the caller still owns it).
func (st *stripe) complete(g *segment, buf []byte, took time.Duration) bool {
	st.mu.Lock()
	defer st.mu.Unlock()
	g.owners--
	st.took += took
	st.fetched++
	if g.done || st.over {
		return false
	}
	g.buf, g.done = buf, true
	st.cond.Broadcast()
	return true
}

// release gives g back (its fetch failed); another worker takes it.
func (st *stripe) release(g *segment) {
	st.mu.Lock()
	defer st.mu.Unlock()
	g.owners--
	if !g.done && g.owners == 0 {
		// Hand it out again before anything new.
		for i, s := range st.segs {
			if s == g && i < st.next {
				st.next = i
				break
			}
		}
	}
	st.cond.Broadcast()
}

// end marks the transfer over and wakes everyone.
func (st *stripe) end() {
	st.mu.Lock()
	st.over = true
	st.cond.Broadcast()
	st.mu.Unlock()
}

// relayStriped serves s, the span a's answer from t covers, from t and the
// other peers in rest at once, then from resume when they all fail. The
// headers are written here; after them, a failure aborts the response.
func (n *Node) relayStriped(w http.ResponseWriter, r *http.Request, rt oci.Route, t target, rest, resume []target, a *attempt, s span, status int, label string) error {
	ctx, cancel := context.WithCancel(r.Context())
	defer cancel()
	// a's body is the start of the blob: it serves the first segment.
	chunk := n.cfg.StripeChunk
	sources := []target{t}
	for _, x := range rest {
		if x.peer != nil && !x.receiving && len(sources) < n.cfg.StripeMaxPeers {
			sources = append(sources, x)
		}
	}
	st := newStripe(s, chunk, 2*len(sources), n.cfg.HedgeDelay)
	n.metrics.striped.Inc()
	w.WriteHeader(status)

	// A ticker wakes waiting workers, so an overdue segment is noticed.
	tick := time.NewTicker(max(n.cfg.HedgeDelay/2, 10*time.Millisecond))
	defer tick.Stop()
	go func() {
		for {
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
				st.cond.Broadcast()
			}
		}
	}()

	var wg sync.WaitGroup
	fallback := resume // under st.mu
	var start func(src target, first *attempt)
	start = func(src target, first *attempt) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			n.stripeWorker(ctx, rt, st, src, first)
			st.mu.Lock()
			st.workers--
			var next []target
			if st.workers == 0 && !st.over && st.written < len(st.segs) && len(fallback) > 0 {
				// Every peer failed: the next tier takes the rest.
				next, fallback = fallback[:1], fallback[1:]
				st.workers++
			}
			st.cond.Broadcast()
			st.mu.Unlock()
			if len(next) > 0 {
				n.metrics.resumes.Inc()
				n.cfg.Logger.InfoContext(ctx, "every striping source failed, the rest comes from the next tier", "digest", rt.Digest)
				start(next[0], nil)
			}
		}()
	}
	// The first source's answer already streams the first segment.
	st.segs[0].owners, st.segs[0].since, st.next = 1, time.Now(), 1
	st.workers = len(sources)
	start(sources[0], a)
	for _, src := range sources[1:] {
		start(src, nil)
	}
	defer func() {
		st.end()
		cancel()
		wg.Wait()
		for _, g := range st.segs {
			if g.buf != nil {
				n.putStripeBuf(g.buf)
				g.buf = nil
			}
		}
	}()

	var hasher hash.Hash
	if n.cfg.VerifyBlobs && status == http.StatusOK && rt.Digest.Algorithm().Available() {
		hasher = rt.Digest.Algorithm().Hash()
	}
	var written int64
	for i, g := range st.segs {
		st.mu.Lock()
		for !g.done && st.workers > 0 && !st.over {
			st.cond.Wait()
		}
		ok := g.done
		st.mu.Unlock()
		if !ok {
			n.abort(ctx, rt, label, fmt.Errorf("striped fetch: no source could serve bytes %d-%d", g.start, g.end))
		}
		if hasher != nil {
			hasher.Write(g.buf)
			if i == len(st.segs)-1 && digest.NewDigest(rt.Digest.Algorithm(), hasher) != rt.Digest {
				for _, src := range sources {
					n.picker.CoolDown(*src.peer)
				}
				n.abort(ctx, rt, label, oci.ErrDigestMismatch)
			}
		}
		if _, err := w.Write(g.buf); err != nil {
			n.metrics.closed.Inc()
			return fmt.Errorf("%w: %w: %v", errAborted, errClientGone, err)
		}
		written += g.size()
		st.mu.Lock()
		n.putStripeBuf(g.buf)
		g.buf = nil
		st.written = i + 1
		st.cond.Broadcast()
		st.mu.Unlock()
	}
	n.metrics.bytes.WithLabelValues(label).Add(float64(written))
	return nil
}

// stripeWorker fetches segments from src until the transfer is over or src
// fails. first, if set, is an answer from src that starts at the first
// segment.
func (n *Node) stripeWorker(ctx context.Context, rt oci.Route, st *stripe, src target, first *attempt) {
	mine := map[*segment]bool{}
	if first != nil {
		// relayStriped claimed the first segment for this answer.
		err := n.fillSegment(ctx, st, st.segs[0], first.resp.Body, time.Now())
		first.resp.Body.Close()
		if err != nil {
			first.done(n.blame(ctx, err))
			return
		}
		first.done(nil)
	}
	for {
		g := st.take(mine)
		if g == nil {
			return
		}
		mine[g] = true
		err := n.fetchSegment(ctx, rt, st, src, g)
		delete(mine, g)
		if err != nil {
			if ctx.Err() == nil && src.peer != nil {
				n.metrics.peerErrors.Inc()
				n.metrics.resumes.Inc() // its segments resume on the others
				n.cfg.Logger.InfoContext(ctx, "striping peer failed; its segments move to the others", "peer", src.peer.ID, "err", err)
			}
			return
		}
	}
}

// blame is what a failed fetch tells the picker: nothing when the
// transfer was cancelled (the client left, or another copy won).
func (n *Node) blame(ctx context.Context, err error) error {
	if ctx.Err() != nil || errors.Is(err, context.Canceled) {
		return nil
	}
	return err
}

// fetchSegment fetches g from src with one range request. The picker
// counts it in flight, so striping and chunked fetches spread by load.
func (n *Node) fetchSegment(ctx context.Context, rt oci.Route, st *stripe, src target, g *segment) error {
	began := time.Now()
	done := func(error) {}
	if src.peer != nil {
		done = n.picker.Start(*src.peer)
	}
	rng := fmt.Sprintf("bytes=%d-%d", g.start, g.end)
	resp, err := n.do(ctx, http.MethodGet, src, rt, rng)
	if err == nil {
		if _, cerr := checkBlob(rt, resp, rng); cerr != nil {
			resp.Body.Close()
			err = cerr
		}
	}
	if err != nil {
		st.release(g)
		done(n.blame(ctx, err))
		return err
	}
	err = n.fillSegment(ctx, st, g, resp.Body, began)
	resp.Body.Close()
	done(n.blame(ctx, err))
	return err
}

// fillSegment reads g's bytes from body and completes g, or releases it.
func (n *Node) fillSegment(ctx context.Context, st *stripe, g *segment, body io.Reader, began time.Time) error {
	buf := n.getStripeBuf(g.size())
	if _, err := io.ReadFull(body, buf); err != nil {
		n.putStripeBuf(buf)
		st.release(g)
		return fmt.Errorf("segment %d-%d: %w", g.start, g.end, err)
	}
	if !st.complete(g, buf, time.Since(began)) {
		n.putStripeBuf(buf)
	}
	if src := ctx.Err(); src != nil {
		return src
	}
	return nil
}

func (n *Node) getStripeBuf(size int64) []byte {
	if b, ok := n.stripeBufs.Get().(*[]byte); ok && int64(cap(*b)) >= size {
		return (*b)[:size]
	}
	return make([]byte, size, max(size, n.cfg.StripeChunk))
}

func (n *Node) putStripeBuf(b []byte) {
	if int64(cap(b)) < n.cfg.StripeChunk {
		return
	}
	b = b[:0]
	n.stripeBufs.Put(&b)
}
