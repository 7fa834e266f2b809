package node

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"io"
	"net/http"
	"net/url"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/shoal-oci/shoal/node/routing"
	"github.com/shoal-oci/shoal/oci"
)

// errNoSource means no target had the content; the caller tries the next tier.
var errNoSource = errors.New("no source holds the content")

// errClientGone means the client closed the connection before the end of
// the body: normal for containerd's chunked fetch, and nobody's fault.
var errClientGone = errors.New("client went away")

// errAborted means the response was already under way when a source failed
// for good; nothing more can be written to the client.
var errAborted = errors.New("response aborted after headers were sent")

// relayChunk is the copy buffer for relayed blobs. Large buffers mean fewer
// syscalls per byte on a fast LAN.
const relayChunk = 1 << 20

// target is one place to relay a request to: a peer or the cache tier.
type target struct {
	base   string
	client *http.Client
	peer   *routing.Peer // nil for the cache tier
	// receiving marks a peer the cache tier named as receiving the blob
	// (a herd): it has a prefix, so it is never striped across.
	receiving bool
	// direct asks the cache tier to serve, not to redirect to receivers.
	direct bool
}

// attempt is a response in hand from one target, plus the bookkeeping to
// finish it: done reports the outcome to the peer picker.
type attempt struct {
	i    int
	resp *http.Response
	done func(error)
}

// relay fetches rt from the targets, hedging across them, and writes the
// answer to w. A peer whose answer is unusable (an error status, a body of
// unknown or wrong length, a wrong digest) is cooled down and the next
// target is tried; a peer's error is never passed on to the client. It
// returns errNoSource when no target had the content, or the cache tier's
// own OCI error when it refused. resume lists extra targets (the cache
// tier) that a blob broken mid-stream may resume from.
func (n *Node) relay(w http.ResponseWriter, r *http.Request, rt oci.Route, targets, resume []target, label string) error {
	ctx := r.Context()
	rng := r.Header.Get("Range")
	left := targets
	for {
		a, err := n.hedge(ctx, r.Method, rt, left, rng)
		if err != nil {
			return err
		}
		t := left[a.i]
		left = without(left, a.i)
		if rt.Kind == oci.KindManifest {
			err = n.relayManifest(w, r, rt, t, a, label)
		} else {
			err = n.relayBlob(w, r, rt, t, left, resume, a, label)
		}
		if !errors.Is(err, errTryNext) {
			return err
		}
	}
}

// errTryNext means a peer's answer was unusable and nothing was written to
// the client yet: the next target is tried.
var errTryNext = errors.New("unusable answer, trying the next source")

// without returns ts without its i-th element, as a new slice.
func without(ts []target, i int) []target {
	out := make([]target, 0, len(ts)-1)
	out = append(out, ts[:i]...)
	return append(out, ts[i+1:]...)
}

// reject cools down a peer whose answer was unusable and says so; the cache
// tier's answer is final and becomes a 502.
func (n *Node) reject(ctx context.Context, t target, a *attempt, label string, err error) error {
	a.resp.Body.Close()
	a.done(err)
	if t.peer != nil {
		n.metrics.peerErrors.Inc()
		n.cfg.Logger.InfoContext(ctx, "peer answer unusable, trying the next source", "peer", t.peer.ID, "err", err)
		return errTryNext
	}
	return oci.Errorf(http.StatusBadGateway, oci.CodeUnavailable, "the %s tier returned an invalid response", label).Wrap(err)
}

// hedge sends the request to targets[0], and to the next target each time
// HedgeDelay passes without an answer or an attempt fails. The first good
// answer wins; the others are cancelled.
func (n *Node) hedge(ctx context.Context, method string, rt oci.Route, targets []target, rng string) (*attempt, error) {
	type result struct {
		attempt
		err    error
		cancel context.CancelFunc
	}
	if len(targets) == 0 {
		return nil, errNoSource
	}
	results := make(chan result, len(targets))
	cancels := make([]context.CancelFunc, len(targets))
	next, pending := 0, 0
	launch := func() {
		i := next
		next++
		pending++
		actx, cancel := context.WithCancel(ctx)
		cancels[i] = cancel
		done := func(error) {}
		if p := targets[i].peer; p != nil {
			done = n.picker.Start(*p)
		}
		go func() {
			resp, err := n.do(actx, method, targets[i], rt, rng)
			results <- result{attempt: attempt{i: i, resp: resp, done: done}, err: err, cancel: cancel}
		}()
	}
	launch()
	delay := n.cfg.HedgeDelay
	if targets[0].receiving {
		// Nodes receiving a blob are a chain, each serving the one behind
		// it: asking the next one ahead too would make it serve two, at
		// half the rate each. The next is asked only when one fails.
		delay = n.cfg.IdleTimeout
	}
	timer := time.NewTimer(delay)
	defer timer.Stop()
	var firstErr, rangeErr error
	for pending > 0 {
		select {
		case <-timer.C:
			if next < len(targets) {
				n.metrics.hedges.Inc()
				launch()
				timer.Reset(delay)
			}
		case res := <-results:
			pending--
			if res.err == nil {
				// Winner: cancel and drain the others in the background.
				for j, c := range cancels {
					if c != nil && j != res.i {
						c()
					}
				}
				go func(left int) {
					for ; left > 0; left-- {
						o := <-results
						if o.resp != nil {
							o.resp.Body.Close()
						}
						o.done(nil)
						o.cancel()
					}
				}(pending)
				winner := res.attempt
				cancel := res.cancel
				inner := winner.done
				winner.done = func(err error) { inner(err); cancel() }
				return &winner, nil
			}
			res.cancel()
			isPeer := targets[res.i].peer != nil
			switch {
			case ctx.Err() != nil, errors.Is(res.err, errNoSource), errors.Is(res.err, errRangeRefused):
				// The client left, a stale record, or a range past the end
				// of the blob: none of them says the peer is sick.
				res.done(nil)
				if isPeer && errors.Is(res.err, errNoSource) {
					n.forget(rt, *targets[res.i].peer)
				}
			case !isPeer && isClientError(res.err):
				res.done(nil) // the cache tier's real answer
			default:
				res.done(res.err)
				if isPeer {
					n.metrics.peerErrors.Inc()
					n.cfg.Logger.InfoContext(ctx, "peer failed", "peer", targets[res.i].peer.ID, "err", res.err)
				}
			}
			switch {
			case errors.Is(res.err, errNoSource):
			case !isPeer && firstErr == nil:
				firstErr = res.err // only the cache tier's errors are passed on
			case errors.Is(res.err, errRangeRefused) && rangeErr == nil:
				rangeErr = res.err
			}
			if next < len(targets) {
				launch()
				timer.Reset(delay)
			}
		}
	}
	if ctx.Err() != nil {
		return nil, ctx.Err()
	}
	var oe *oci.Error
	if errors.As(firstErr, &oe) {
		return nil, oe // a real answer from the cache tier: pass it on
	}
	if errors.As(rangeErr, &oe) {
		return nil, oe // every holder says the range is past the end
	}
	return nil, errNoSource
}

// errRangeRefused marks a peer's 416: the client's range lies past the end
// of the blob. It is the request's fault, not the peer's.
var errRangeRefused = errors.New("range not satisfiable")

// isClientError reports whether err is a target's 4xx answer: the request
// was at fault, not the target.
func isClientError(err error) bool {
	var oe *oci.Error
	return errors.As(err, &oe) && oe.Status >= 400 && oe.Status < 500
}

// do sends one request to one target and classifies the answer.
func (n *Node) do(ctx context.Context, method string, t target, rt oci.Route, rng string) (*http.Response, error) {
	ref := rt.Tag
	kind := "manifests"
	if rt.Tag == "" {
		ref = rt.Digest.String()
	}
	if rt.Kind == oci.KindBlob {
		kind = "blobs"
	}
	u := strings.TrimSuffix(t.base, "/") + "/v2/" + rt.Name + "/" + kind + "/" + ref + "?ns=" + url.QueryEscape(rt.Registry)
	req, err := http.NewRequestWithContext(ctx, method, u, nil)
	if err != nil {
		return nil, fmt.Errorf("build request: %w", err)
	}
	if t.peer != nil {
		req.Header.Set(PeerHeader, "1")
		n.cfg.PeerKey.Sign(req, time.Now())
	} else if id := n.herdID(); id != "" && rt.Kind == oci.KindBlob && method == http.MethodGet {
		req.Header.Set(oci.HerdPeerHeader, id)
		if addrs := n.herdAddrs(); addrs != "" {
			req.Header.Set(oci.HerdAddrsHeader, addrs)
		}
		if t.direct {
			req.Header.Set(oci.HerdDirectHeader, "1")
		}
	}
	if rng != "" && rt.Kind == oci.KindBlob {
		req.Header.Set("Range", rng)
	}
	if rt.Kind == oci.KindManifest {
		req.Header.Set("Accept", oci.ManifestAccept)
	}
	var resp *http.Response
	if t.peer != nil && method == http.MethodGet && rt.Kind == oci.KindBlob && !n.cfg.VerifyBlobs {
		d := n.dialer
		if strings.HasSuffix(rng, "-") {
			d = n.chunkDialer
		}
		if t.receiving {
			// A receiver is alive (the cache tier has just placed this
			// node behind it) and skipping it costs a chain half its rate:
			// outlast a lost SYN, which TCP sends again after a second.
			rd := *d
			rd.Timeout = receiverDialTimeout
			d = &rd
		}
		resp, err = rawGet(ctx, d, req, n.idleFor(t))
	} else {
		resp, err = t.client.Do(req)
		if err == nil {
			resp.Body = oci.NewIdleReader(resp.Body, n.idleFor(t))
		}
	}
	if err != nil {
		return nil, fmt.Errorf("%s %s: %w", method, t.base, err)
	}
	switch resp.StatusCode {
	case http.StatusOK, http.StatusPartialContent:
		return resp, nil
	case http.StatusNotFound:
		resp.Body.Close()
		return nil, errNoSource
	}
	defer resp.Body.Close()
	oe := errorFromResponse(resp)
	if t.peer == nil {
		return nil, oe
	}
	// A peer's error is never the client's answer: containerd moves to its
	// next host only on a 404, so a peer's 500 or 400 would fail the pull.
	if resp.StatusCode == http.StatusRequestedRangeNotSatisfiable {
		return nil, fmt.Errorf("peer %s: %w: %w", t.base, errRangeRefused, oe)
	}
	return nil, fmt.Errorf("peer %s answered %d %s: %s", t.base, resp.StatusCode, oe.Code, oe.Message)
}

// errorFromResponse turns a non-2xx answer into an *oci.Error, keeping the
// status and the first error's code and message.
func errorFromResponse(resp *http.Response) *oci.Error {
	oe := &oci.Error{Status: resp.StatusCode, Code: oci.CodeUnavailable, Message: http.StatusText(resp.StatusCode)}
	var env struct {
		Errors []struct {
			Code    oci.ErrorCode `json:"code"`
			Message string        `json:"message"`
		} `json:"errors"`
	}
	if b, err := io.ReadAll(io.LimitReader(resp.Body, 64<<10)); err == nil && json.Unmarshal(b, &env) == nil && len(env.Errors) > 0 {
		oe.Code, oe.Message = env.Errors[0].Code, env.Errors[0].Message
	}
	for _, h := range []string{"Retry-After", "Content-Range", "Warning", oci.HerdReceiversHeader, oci.HerdReceiverAddrsHeader} {
		if v := resp.Header.Get(h); v != "" {
			if oe.Header == nil {
				oe.Header = http.Header{}
			}
			oe.Header.Set(h, v)
		}
	}
	return oe
}

// relayManifest reads a manifest whole (bounded), checks it against its
// digest, and only then writes it.
func (n *Node) relayManifest(w http.ResponseWriter, r *http.Request, rt oci.Route, t target, a *attempt, label string) error {
	resp := a.resp
	d, err := digestOf(rt, resp)
	if err != nil {
		return n.reject(r.Context(), t, a, label, err)
	}
	defer resp.Body.Close()
	h := w.Header()
	h.Set("Content-Type", resp.Header.Get("Content-Type"))
	h.Set("Docker-Content-Digest", d.String())
	if v := resp.Header.Get("Warning"); v != "" {
		h.Set("Warning", v)
	}
	if r.Method == http.MethodHead {
		a.done(nil)
		if v := resp.Header.Get("Content-Length"); v != "" {
			h.Set("Content-Length", v)
		}
		w.WriteHeader(http.StatusOK)
		return nil
	}
	b, err := io.ReadAll(io.LimitReader(resp.Body, oci.MaxManifestSize+1))
	if err == nil && len(b) > oci.MaxManifestSize {
		err = fmt.Errorf("manifest %s larger than %d bytes", d, oci.MaxManifestSize)
	}
	if err == nil && (!d.Algorithm().Available() || d.Algorithm().FromBytes(b) != d) {
		err = fmt.Errorf("%w: manifest %s", oci.ErrDigestMismatch, d)
	}
	if err != nil {
		n.cfg.Logger.WarnContext(r.Context(), "relayed manifest rejected", "source", label, "digest", d, "err", err)
		return n.reject(r.Context(), t, a, label, err)
	}
	a.done(nil)
	h.Set("Content-Length", strconv.Itoa(len(b)))
	w.WriteHeader(http.StatusOK)
	_, _ = w.Write(b)
	n.metrics.bytes.WithLabelValues(label).Add(float64(len(b)))
	return nil
}

// span is the part of a blob a response covers.
type span struct {
	start, end, total int64 // inclusive end
}

func responseSpan(resp *http.Response) (span, error) {
	if resp.StatusCode == http.StatusPartialContent {
		var s span
		cr := resp.Header.Get("Content-Range")
		if _, err := fmt.Sscanf(cr, "bytes %d-%d/%d", &s.start, &s.end, &s.total); err != nil || s.start < 0 || s.end < s.start || s.end >= s.total {
			return span{}, fmt.Errorf("bad Content-Range %q", cr)
		}
		return s, nil
	}
	l, err := contentLength(resp)
	if err != nil || l < 0 {
		return span{}, fmt.Errorf("response has no usable Content-Length")
	}
	return span{start: 0, end: l - 1, total: l}, nil
}

// checkBlob says whether a blob answer fits the request: a usable length,
// the right digest, and the range that was asked for (the whole blob when
// none was).
func checkBlob(rt oci.Route, resp *http.Response, rng string) (span, error) {
	s, err := responseSpan(resp)
	if err != nil {
		return span{}, err
	}
	if dh := resp.Header.Get("Docker-Content-Digest"); dh != "" && dh != rt.Digest.String() {
		return span{}, fmt.Errorf("source answered %s with digest %s", rt.Digest, dh)
	}
	if s.total == 0 && rt.Digest != emptyDigest(rt.Digest) {
		// Only the empty blob has no bytes: anything else claiming to be
		// empty would hand the client a body that can never verify.
		return span{}, fmt.Errorf("source claims %s is empty", rt.Digest)
	}
	if rng == "" {
		if resp.StatusCode != http.StatusOK {
			return span{}, fmt.Errorf("source answered a whole-blob request with %d", resp.StatusCode)
		}
		return s, nil
	}
	br, ranged, err := oci.ParseRange(rng, s.total)
	if err != nil {
		return span{}, fmt.Errorf("the requested range does not fit the source's blob of %d bytes: %w", s.total, err)
	}
	want := span{start: 0, end: s.total - 1, total: s.total}
	if ranged {
		want = span{start: br.Start, end: br.Start + br.Length() - 1, total: s.total}
	}
	if s != want {
		return span{}, fmt.Errorf("source answered bytes %d-%d/%d for range %q", s.start, s.end, s.total, rng)
	}
	return s, nil
}

// emptyDigest is the digest of no bytes, in d's algorithm ("" if that
// algorithm is not available).
func emptyDigest(d digest.Digest) digest.Digest {
	if !d.Algorithm().Available() {
		return ""
	}
	return d.Algorithm().FromBytes(nil)
}

// relayBlob streams a blob from a (the answer of t). When the source breaks
// mid-stream it resumes on another target (rest, then resume) with a Range
// request. With VerifyBlobs a whole blob is hashed as it passes and its last
// chunk is held back until the digest checks out, so a client never
// receives a complete-looking body with bad bytes. When the client goes
// away (containerd closes each chunk of a chunked fetch), the transfer
// stops at once and no source is blamed.
func (n *Node) relayBlob(w http.ResponseWriter, r *http.Request, rt oci.Route, t target, rest, resume []target, a *attempt, label string) error {
	ctx := r.Context()
	s, err := checkBlob(rt, a.resp, r.Header.Get("Range"))
	if err != nil {
		return n.reject(ctx, t, a, label, err)
	}
	h := w.Header()
	setBlobHeaders(h, rt.Digest)
	h.Set("Content-Length", strconv.FormatInt(s.end-s.start+1, 10))
	status := http.StatusOK
	if a.resp.StatusCode == http.StatusPartialContent {
		status = http.StatusPartialContent
		h.Set("Content-Range", fmt.Sprintf("bytes %d-%d/%d", s.start, s.end, s.total))
	}
	if r.Method == http.MethodHead {
		a.resp.Body.Close()
		a.done(nil)
		w.WriteHeader(status)
		return nil
	}
	if t.peer != nil && !t.receiving && n.shouldStripe(r, s, rest) {
		return n.relayStriped(w, r, rt, t, rest, resume, a, s, status, label)
	}
	w.WriteHeader(status)
	// Send the headers now, not with the first body bytes: a source's first
	// bytes may take long (deep in a herd's chain, a hop per node ahead), and
	// containerd gives up on headers after 30 s.
	if f, ok := w.(http.Flusher); ok {
		f.Flush()
	}

	var hasher hash.Hash
	if n.cfg.VerifyBlobs && status == http.StatusOK && rt.Digest.Algorithm().Available() {
		hasher = rt.Digest.Algorithm().Hash()
	}
	c := &blobCopy{w: w, hasher: hasher}
	if hasher != nil {
		// Only the hashing relay copies through user space; the buffers are
		// pooled, since a fresh 2 MiB per request costs more than the request.
		bufs := n.bufs.Get().(*[2][]byte)
		defer n.bufs.Put(bufs)
		c.buf, c.held = bufs[0], bufs[1][:0]
	}
	want := s.end - s.start + 1
	var served []*routing.Peer // the peers whose bytes went into this response
	left := append(append([]target(nil), rest...), resume...)
	for {
		if t.peer != nil {
			served = append(served, t.peer)
		}
		var err error
		if hasher == nil {
			// No hashing: hand the bytes over as they are, by splice from a
			// peer's connection. The client verifies the digest before it
			// stores anything; containerd always does.
			var k int64
			if rb, ok := a.resp.Body.(*rawBody); ok {
				k, err = rb.WriteTo(w)
			} else {
				k, err = io.Copy(w, io.LimitReader(a.resp.Body, want-c.n))
			}
			c.n += k
		} else {
			err = c.copy(a.resp.Body, want-c.n)
		}
		a.resp.Body.Close()
		if err == nil && c.n == want {
			a.done(nil)
			break
		}
		if err == nil {
			err = io.ErrUnexpectedEOF
		}
		if c.writeErr != nil || n.clientGone(ctx, err) {
			a.done(nil) // the client left: says nothing about the source
			n.metrics.closed.Inc()
			return fmt.Errorf("%w: %w: %v", errAborted, errClientGone, err)
		}
		a.done(err)
		n.cfg.Logger.InfoContext(ctx, "source broke mid-stream, resuming elsewhere", "digest", rt.Digest, "offset", s.start+c.n, "err", err)
		left = n.morePeers(ctx, rt, left, served)
		next, nt, rerr := n.resume(ctx, rt, left, span{start: s.start + c.n, end: s.end, total: s.total})
		if rerr != nil {
			n.abort(ctx, rt, label, fmt.Errorf("resume: %w", rerr))
		}
		left = without(left, slices.IndexFunc(left, func(x target) bool { return x.base == nt.base }))
		n.metrics.resumes.Inc()
		a, t = next, nt
	}
	if hasher != nil && digest.NewDigest(rt.Digest.Algorithm(), hasher) != rt.Digest {
		for _, p := range served {
			n.picker.CoolDown(*p)
		}
		n.abort(ctx, rt, label, oci.ErrDigestMismatch)
	}
	if err := c.flush(); err != nil {
		return fmt.Errorf("%w: %v", errAborted, err)
	}
	n.metrics.bytes.WithLabelValues(label).Add(float64(c.n))
	return nil
}

// resume finds a target among left that answers the rest of a blob, sp,
// with exactly that range. Unusable answers cool their peer down and the
// next target is tried.
func (n *Node) resume(ctx context.Context, rt oci.Route, left []target, sp span) (*attempt, target, error) {
	rng := fmt.Sprintf("bytes=%d-%d", sp.start, sp.end)
	for {
		a, err := n.hedge(ctx, http.MethodGet, rt, left, rng)
		if err != nil {
			return nil, target{}, err
		}
		t := left[a.i]
		got, cerr := checkBlob(rt, a.resp, rng)
		if cerr == nil && got.total == sp.total {
			return a, t, nil
		}
		if cerr == nil {
			cerr = fmt.Errorf("source holds %d bytes, not %d", got.total, sp.total)
		}
		a.resp.Body.Close()
		a.done(cerr)
		n.cfg.Logger.InfoContext(ctx, "resume answer unusable", "source", t.base, "err", cerr)
		left = without(left, a.i)
	}
}

// clientGone reports whether a failed copy failed because the client went
// away. A short or stalled source is the source's fault; for anything else
// (a reset, a broken pipe: either side's) it waits a moment for the
// server to notice a closed client connection, which cancels ctx.
func (n *Node) clientGone(ctx context.Context, err error) bool {
	if ctx.Err() != nil {
		return true
	}
	if errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, oci.ErrStalled) || errors.Is(err, os.ErrDeadlineExceeded) {
		return false
	}
	t := time.NewTimer(200 * time.Millisecond)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return true
	case <-t.C:
		return false
	}
}

// abort ends a response whose headers are already sent: the client sees a
// broken connection, never a complete-looking body.
func (n *Node) abort(ctx context.Context, rt oci.Route, label string, err error) {
	n.metrics.aborts.Inc()
	n.cfg.Logger.WarnContext(ctx, "relay aborted", "source", label, "digest", rt.Digest, "err", err)
	panic(http.ErrAbortHandler)
}

// blobCopy copies bytes to the client, hashing them and holding the latest
// chunk back until flush.
type blobCopy struct {
	w        io.Writer
	hasher   hash.Hash
	buf      []byte
	held     []byte
	n        int64 // bytes received (held ones included)
	writeErr error
}

// copy reads up to max bytes from r. It returns nil at EOF or after max bytes.
func (c *blobCopy) copy(r io.Reader, max int64) error {
	for max > 0 {
		p := c.buf
		if int64(len(p)) > max {
			p = p[:max]
		}
		k, err := io.ReadFull(r, p)
		if k > 0 {
			if c.hasher != nil {
				c.hasher.Write(p[:k])
			}
			if err := c.flush(); err != nil {
				return err
			}
			// Swap buffers: the chunk just read is held, the flushed one is reused.
			c.held, c.buf = p[:k], c.held[:cap(c.held)]
			c.n += int64(k)
			max -= int64(k)
		}
		if errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, io.EOF) {
			if max > 0 {
				return io.ErrUnexpectedEOF
			}
			return nil
		}
		if err != nil {
			return err
		}
	}
	return nil
}

func (c *blobCopy) flush() error {
	if len(c.held) == 0 {
		return nil
	}
	_, err := c.w.Write(c.held)
	c.held = c.held[:0]
	if err != nil {
		c.writeErr = err
	}
	return err
}

// setBlobHeaders sets the headers of a blob answer that every source gives.
func setBlobHeaders(h http.Header, d digest.Digest) {
	h.Set("Content-Type", "application/octet-stream")
	h.Set("Docker-Content-Digest", d.String())
	h.Set("Accept-Ranges", "bytes")
	h.Set("Etag", `"`+d.String()+`"`)
}
