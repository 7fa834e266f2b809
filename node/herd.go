package node

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/shoal-oci/shoal/node/routing"
	"github.com/shoal-oci/shoal/node/store"
	"github.com/shoal-oci/shoal/oci"
)

// Herds: many nodes asking for one blob at once (a scale-out). The cache
// tier serves the first few and sends the others to nodes that are
// receiving the blob (oci/herd.go). Such a node serves a peer the blob from
// containerd's ingest, the file containerd writes the bytes into as they
// arrive, following it as it grows: the bytes it serves are the ones its
// containerd received, in order, and containerd keeps them, not shoal. The
// requester's containerd verifies the digest of the whole blob, as it does
// for every source.

// Metric label values of herd transfers.
const (
	// sourceReceiver labels bytes relayed from a node still receiving them.
	sourceReceiver = "receiver"
	// sourceInflight labels peer requests this node served from a
	// transfer in progress (containerd's ingest).
	sourceInflight = "inflight"
)

// ingestOpener is what a Store may also do: open a blob that containerd is
// still receiving. The containerd store implements it.
type ingestOpener interface {
	// OpenIngest opens the file containerd writes d into as it arrives
	// and returns the blob's size as containerd was told it (0: unknown).
	// It returns store.ErrNotFound when containerd is not receiving d.
	OpenIngest(ctx context.Context, d digest.Digest) (*os.File, int64, error)
}

// herdRouter is what a Router may also do for herds: name this node and
// the addresses it can be dialled at, and find a peer by the ID (and the
// addresses, hints to dial first) the cache tier gave.
type herdRouter interface {
	ID() string
	DialAddrs() []string
	Peer(ctx context.Context, id string, addrs []string) (routing.Peer, error)
}

// receiving counts this node's containerd's requests in progress per blob:
// while there is one, containerd may be writing the blob into its ingest.
// It also remembers, for recentFor, the blobs whose last request ended
// lately: containerd has committed them, but until the pull's last blob
// it has written no image record that would let the local store serve
// them, and a herd's followers may still ask.
type receiving struct {
	mu    sync.Mutex
	n     map[digest.Digest]int
	ended map[digest.Digest]time.Time
}

// recentFor is how long after its last request a blob counts as received.
const recentFor = 2 * time.Minute

func (rc *receiving) add(d digest.Digest) func() {
	rc.mu.Lock()
	if rc.n == nil {
		rc.n = map[digest.Digest]int{}
	}
	rc.n[d]++
	rc.mu.Unlock()
	var once sync.Once
	return func() { once.Do(func() { rc.end(d) }) }
}

// end counts one of d's requests done.
func (rc *receiving) end(d digest.Digest) {
	rc.mu.Lock()
	defer rc.mu.Unlock()
	if rc.n[d]--; rc.n[d] > 0 {
		return
	}
	delete(rc.n, d)
	now := time.Now()
	if rc.ended == nil {
		rc.ended = map[digest.Digest]time.Time{}
	}
	for k, t := range rc.ended {
		if now.Sub(t) > recentFor {
			delete(rc.ended, k)
		}
	}
	rc.ended[d] = now
}

// has reports whether containerd is fetching d now, or was a moment ago.
func (rc *receiving) has(d digest.Digest) bool {
	active, recent := rc.state(d)
	return active || recent
}

// active reports whether containerd is fetching d now.
func (rc *receiving) active(d digest.Digest) bool {
	active, _ := rc.state(d)
	return active
}

func (rc *receiving) state(d digest.Digest) (active, recent bool) {
	rc.mu.Lock()
	defer rc.mu.Unlock()
	if rc.n[d] > 0 {
		return true, false
	}
	t, ok := rc.ended[d]
	return false, ok && time.Since(t) <= recentFor
}

// herdID is this node's peer ID for the herd protocol, "" when it cannot
// take part (no DHT router).
func (n *Node) herdID() string {
	if hr, ok := n.cfg.Router.(herdRouter); ok {
		return hr.ID()
	}
	return ""
}

// herdAddrs is the HerdAddrsHeader value of this node's herd requests.
func (n *Node) herdAddrs() string {
	hr, ok := n.cfg.Router.(herdRouter)
	if !ok {
		return ""
	}
	addrs := hr.DialAddrs()
	return strings.Join(addrs[:min(len(addrs), oci.MaxHerdAddrs)], ",")
}

// inflightSource serves a peer a blob this node's containerd is still
// receiving.
type inflightSource struct{ n *Node }

func (inflightSource) name() string { return sourceInflight }

// ingestWait bounds how long a peer's request waits for containerd to open
// the ingest of a blob this node has asked for: the cache tier may send a
// peer here a moment before this node's own answer starts.
const ingestWait = 2 * time.Second

// receiverIdle is how long a node waits on a receiver that sends nothing.
// containerd writes a blob into its ingest a MiB at a time, so each node of
// a chain starts a MiB's transfer time after the one ahead: deep in a long
// chain on a slow link the first byte takes a while. A receiver waits only
// while its own fetch runs, and that fetch resumes elsewhere within the
// idle timeout when its source stalls, so a break anywhere up the chain is
// mended below it; this bound is for a receiver that hangs.
const receiverIdle = 2 * time.Minute

// idleFor is the idle timeout of a body from t.
func (n *Node) idleFor(t target) time.Duration {
	if t.receiving {
		return max(n.cfg.IdleTimeout, receiverIdle)
	}
	return n.cfg.IdleTimeout
}

// receiverResolveTimeout bounds reaching the nearest receiver the cache
// tier named. Skipping it makes the next one ahead serve two nodes, and
// everything behind this node then runs at half the rate, so a dial is
// retried this long: when a herd starts, every node starts its transfers
// at once, and a first dial may be slow or lost.
const receiverResolveTimeout = 10 * time.Second

// receiverDialTimeout bounds the TCP dial of a receiver's registry port.
const receiverDialTimeout = 5 * time.Second

// receiverRetry is the pause between dials of a receiver.
const receiverRetry = 250 * time.Millisecond

// ingestPoll is how often a followed ingest is checked for new bytes.
const ingestPoll = 5 * time.Millisecond

func (s inflightSource) serve(w http.ResponseWriter, r *http.Request, rt oci.Route) error {
	n := s.n
	opener, ok := n.cfg.Store.(ingestOpener)
	if !ok || rt.Kind != oci.KindBlob {
		return errNoSource
	}
	if !n.receivingNow.has(rt.Digest) {
		n.cfg.Logger.DebugContext(r.Context(), "peer asked for a blob this node is not receiving", "digest", rt.Digest)
		return errNoSource
	}
	ctx := r.Context()
	var (
		f     *os.File
		total int64
		err   error
	)
	deadline := time.Now().Add(ingestWait)
	for {
		f, total, err = opener.OpenIngest(ctx, rt.Digest)
		if err == nil {
			break
		}
		if !errors.Is(err, store.ErrNotFound) {
			n.cfg.Logger.WarnContext(ctx, "open ingest", "digest", rt.Digest, "err", err)
			return errNoSource
		}
		// Committed meanwhile: the local store has it now.
		if desc, serr := n.cfg.Store.Stat(ctx, rt.Digest); serr == nil {
			return n.serveLocal(w, r, rt, desc)
		}
		if time.Now().After(deadline) || !n.receivingNow.active(rt.Digest) {
			return errNoSource
		}
		if err := sleepCtx(ctx, 20*time.Millisecond); err != nil {
			return errNoSource
		}
	}
	defer f.Close()
	if total <= 0 {
		return errNoSource // a size is needed for Content-Length
	}
	return n.serveIngest(w, r, rt, f, total)
}

// serveIngest serves f, a blob of total bytes that containerd is writing,
// from the range asked for, waiting for each byte to be written, for as
// long as this node is fetching the blob. A file that shrinks (containerd
// started over), or stops growing for IdleTimeout once this node's fetch
// has ended, aborts the response: the requester resumes elsewhere.
func (n *Node) serveIngest(w http.ResponseWriter, r *http.Request, rt oci.Route, f *os.File, total int64) error {
	ctx := r.Context()
	br, ranged, err := oci.ParseRange(r.Header.Get("Range"), total)
	if err != nil {
		return err
	}
	start, length := int64(0), total
	if ranged {
		start, length = br.Start, br.Length()
	}
	h := w.Header()
	setBlobHeaders(h, rt.Digest)
	h.Set("Content-Length", strconv.FormatInt(length, 10))
	status := http.StatusOK
	if ranged {
		status = http.StatusPartialContent
		h.Set("Content-Range", fmt.Sprintf("bytes %d-%d/%d", start, start+length-1, total))
	}
	w.WriteHeader(status)
	if r.Method == http.MethodHead {
		return nil
	}
	// Send the headers now: deep in a chain the first bytes take a while,
	// and the peer should know it is being served.
	if f, ok := w.(http.Flusher); ok {
		f.Flush()
	}
	pos, end := start, start+length
	grew := time.Now()
	tick := time.NewTicker(ingestPoll)
	defer tick.Stop()
	for pos < end {
		fi, err := f.Stat()
		if err != nil {
			n.abort(ctx, rt, sourceInflight, fmt.Errorf("stat ingest: %w", err))
		}
		size := min(fi.Size(), end)
		switch {
		case fi.Size() < pos:
			n.abort(ctx, rt, sourceInflight, fmt.Errorf("containerd's ingest shrank to %d bytes, past %d served", fi.Size(), pos))
		case size > pos:
			k, err := io.Copy(w, io.NewSectionReader(f, pos, size-pos))
			pos += k
			n.metrics.inflightBytes.Add(float64(k))
			if err != nil {
				return fmt.Errorf("%w: %w: %v", errAborted, errClientGone, err)
			}
			grew = time.Now()
			continue
		case n.receivingNow.active(rt.Digest):
			// This node is still fetching the blob: its own relay resumes
			// elsewhere if its source stalls. Waiting on it here, rather
			// than giving up, keeps a slow start from breaking a chain.
			grew = time.Now()
		case time.Since(grew) > n.cfg.IdleTimeout:
			n.abort(ctx, rt, sourceInflight, fmt.Errorf("containerd's ingest stopped at %d of %d bytes for %s after this node's fetch ended", pos, total, n.cfg.IdleTimeout))
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%w: %w", errAborted, errClientGone)
		case <-tick.C:
		}
	}
	return nil
}

// receiver is a node the cache tier named as receiving a blob: its peer ID
// and the addresses it gave the cache tier, each ending in /p2p/<id>.
type receiver struct {
	id    string
	addrs []string
}

// receiversOf returns the receivers of a cache tier's herd redirect, at
// most 8, or nil when err is none.
func receiversOf(err error) []receiver {
	var oe *oci.Error
	if !errors.As(err, &oe) || oe.Status != oci.HerdRedirectStatus || oe.Header == nil {
		return nil
	}
	var rs []receiver
	for _, id := range strings.Split(oe.Header.Get(oci.HerdReceiversHeader), ",") {
		if id = strings.TrimSpace(id); oci.ValidPeerID(id) && len(rs) < 8 {
			rs = append(rs, receiver{id: id})
		}
	}
	// Each address names its peer; one that names no receiver is dropped.
	for _, a := range strings.Split(oe.Header.Get(oci.HerdReceiverAddrsHeader), ",") {
		a = strings.TrimSpace(a)
		i := strings.LastIndex(a, "/p2p/")
		if i < 0 || len(oci.HerdAddrs(a[:i])) != 1 {
			continue
		}
		for j := range rs {
			if rs[j].id == a[i+len("/p2p/"):] && len(rs[j].addrs) < oci.MaxHerdAddrs {
				rs[j].addrs = append(rs[j].addrs, a)
			}
		}
	}
	return rs
}

// relayReceivers serves rt from the nodes the cache tier named as receiving
// it, nearest the source first, and from the cache tier itself (asked to
// serve, not redirect) when none of them can: before the first byte, or to
// resume after a receiver broke mid-stream.
func (n *Node) relayReceivers(w http.ResponseWriter, r *http.Request, rt oci.Route, rs []receiver) error {
	direct := n.directCacheTargets()
	hr, _ := n.cfg.Router.(herdRouter)
	var targets []target
	if hr != nil {
		// Each receiver is dialled until it answers or the time is up,
		// all at once; the nearest is waited for, and the ones further
		// ahead that answered by then are the fallbacks. With the
		// addresses the cache tier passed on, no DHT lookup is needed.
		ctx, cancel := context.WithTimeout(r.Context(), max(n.cfg.LookupTimeout, receiverResolveTimeout))
		// Each goroutine writes only its own slot, read once all are done.
		peers := make([]*routing.Peer, len(rs))
		done := make([]chan struct{}, len(rs))
		for i, rc := range rs {
			done[i] = make(chan struct{})
			go func() {
				defer close(done[i])
				for {
					p, err := hr.Peer(ctx, rc.id, rc.addrs)
					if err == nil {
						peers[i] = &p
						return
					}
					if sleepCtx(ctx, receiverRetry) != nil {
						if errors.Is(ctx.Err(), context.DeadlineExceeded) {
							n.cfg.Logger.InfoContext(r.Context(), "receiver not reachable", "digest", rt.Digest, "peer", rc.id, "addrs", len(rc.addrs), "err", err)
						}
						return
					}
				}
			}()
		}
		if len(rs) > 0 {
			<-done[0]
		}
		cancel() // the others stop where they are
		for _, d := range done {
			<-d
		}
		for _, p := range peers {
			if p != nil {
				targets = append(targets, target{base: p.Addr, client: n.peers, peer: p, receiving: true})
			}
		}
	}
	err := n.relay(w, r, rt, targets, direct, sourceReceiver)
	if errors.Is(err, errNoSource) {
		n.cfg.Logger.InfoContext(r.Context(), "no receiver could serve, asking the cache tier to", "digest", rt.Digest, "receivers", len(rs), "reachable", len(targets))
		err = n.relay(w, r, rt, direct, nil, sourceCache)
	}
	return err
}

// sleepCtx waits d, or until ctx ends (its error).
func sleepCtx(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}
