package cache

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/opencontainers/go-digest"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/shoal-oci/shoal/cache/flight"
	"github.com/shoal-oci/shoal/cache/herd"
	"github.com/shoal-oci/shoal/oci"
	"github.com/shoal-oci/shoal/upstream"
	"github.com/shoal-oci/shoal/upstream/budget"
)

// Results of a request, the label of shoal_cache_requests_total.
const (
	resultHit         = "hit"         // served from storage, no upstream request
	resultMiss        = "miss"        // fetched from upstream
	resultRevalidated = "revalidated" // tag checked upstream with a free HEAD, unchanged
	resultStale       = "stale"       // served from storage although upstream could not confirm it
	resultError       = "error"
	resultRedirected  = "redirected" // a node sent to the nodes receiving the blob (herd)
)

// staleWarning is the RFC 7234 warning for a response served stale.
const staleWarning = `110 shoal "Response is stale: %s"`

// req is one parsed request.
type req struct {
	oci.Route
	repo string // upstream repository, "library/" added for Docker Hub
	head bool
	what string // names the request in errors; default "manifest <digest>"
}

// describe names the request in error messages.
func (q req) describe() string {
	if q.what != "" {
		return q.what
	}
	return "manifest " + q.Digest.String()
}

// ServeHTTP serves the distribution API, pull side.
func (c *Cache) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Docker-Distribution-API-Version", "registry/2.0")
	result, kind, err := c.serve(w, r)
	if err != nil {
		result = resultError
		var oe *oci.Error
		if !errors.As(err, &oe) || oe.Status >= 500 {
			c.cfg.Logger.WarnContext(r.Context(), "request failed", "method", r.Method, "path", r.URL.Path, "err", err)
		}
		if !errors.Is(err, errAborted) {
			oci.WriteError(w, r, err)
		}
	}
	if kind != "" {
		c.metrics.requests.WithLabelValues(result, kind).Inc()
	}
}

// errAborted marks an error after the response started: nothing more can be written.
var errAborted = errors.New("response aborted")

func (c *Cache) serve(w http.ResponseWriter, r *http.Request) (result, kind string, err error) {
	rt, err := oci.ParseRoute(r)
	if err != nil {
		return "", "", err
	}
	if r.Header.Get(ReplicaHeader) != "" {
		// Another replica relays this request: answer it here, never relay on.
		r = r.WithContext(flight.NoRelay(r.Context()))
	} else if host, _, err := net.SplitHostPort(r.RemoteAddr); err == nil {
		// Counted pulls are charged to the client (node) that caused them.
		r = r.WithContext(budget.WithClient(r.Context(), host))
	}
	if rt.Kind == oci.KindBase {
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Content-Length", "2")
		if r.Method == http.MethodGet {
			_, _ = io.WriteString(w, "{}")
		}
		return "", "", nil
	}
	if !c.registries[rt.Registry] {
		return "", "", oci.Errorf(http.StatusNotFound, oci.CodeNameUnknown, "registry %s is not configured as an upstream of this cache", rt.Registry)
	}
	q := req{Route: rt, repo: upstream.NormalizeRepo(rt.Registry, rt.Name), head: r.Method == http.MethodHead}
	if err := oci.ValidateName(q.repo); err != nil {
		return "", "", err
	}
	switch {
	case rt.Kind == oci.KindBlob:
		result, err = c.serveBlob(w, r, q)
		return result, "blob", err
	case rt.Tag != "":
		if !q.head {
			c.metrics.pulls.inc(q.Registry, q.repo)
		}
		result, err = c.serveTag(w, r, q)
	default:
		result, err = c.serveManifestDigest(w, r, q, true)
	}
	return result, "manifest", err
}

// serveTag resolves a tag: fresh record → storage; stale record → free
// upstream HEAD; unknown tag → HEAD, then a counted GET only for content
// the cache does not already hold.
func (c *Cache) serveTag(w http.ResponseWriter, r *http.Request, q req) (string, error) {
	ctx := r.Context()
	rec, ok, err := c.store.getTag(ctx, q.Registry, q.repo, q.Tag)
	if err != nil {
		return "", err
	}
	now := c.cfg.Now()
	if ok && now.Sub(rec.Validated) < c.freshness(q.Registry) {
		if served, err := c.serveStoredManifest(w, r, q, rec.Digest, ""); served || err != nil {
			return resultHit, err
		}
	}
	hctx, cancel := context.WithTimeout(ctx, c.cfg.UpstreamTimeout)
	desc, herr := c.cfg.Upstream.HeadManifest(hctx, q.Registry, q.repo, q.Tag)
	cancel()
	if herr != nil {
		if upstream.IsNotFound(herr) {
			if ok {
				_ = c.store.deleteTag(ctx, q.Registry, q.repo, q.Tag)
			}
			return "", oci.ErrManifestUnknown
		}
		if ok {
			if served, err := c.serveStoredManifest(w, r, q, rec.Digest, staleReason(herr)); served || err != nil {
				c.metrics.stale.WithLabelValues(staleLabel(herr)).Inc()
				return resultStale, err
			}
		}
		return "", c.upstreamError(herr, "tag "+q.Reference())
	}
	result := resultMiss
	if ok && rec.Digest == desc.Digest {
		result = resultRevalidated
	}
	next := tagRecord{Digest: desc.Digest, MediaType: desc.MediaType, Size: desc.Size, Validated: now}
	if _, _, held, err := c.store.getManifest(ctx, q.Registry, q.repo, desc.Digest); err == nil && held {
		// Unchanged, or moved to content the cache already holds: no counted request.
		c.recordTag(ctx, q, next)
		if served, err := c.serveStoredManifest(w, r, q, desc.Digest, ""); served || err != nil {
			if result == resultMiss {
				result = resultHit
			}
			return result, err
		}
	}
	if q.head {
		// A HEAD never costs a counted request: answer from the upstream HEAD.
		// containerd resolves a tag with HEAD and then GETs the manifest by
		// digest, so record a tag seen for the first time now: otherwise the
		// next pull asks upstream again, and an outage makes the cached image
		// unresolvable. An existing record is kept as the stale fallback
		// until the new content is held.
		if !ok {
			c.recordTag(ctx, q, next)
		}
		// The tag moved to content the cache does not hold. If the budget
		// will not let the client's next request (GET by digest) fetch it,
		// point the client at the old content instead: stale beats a
		// digest that cannot be pulled.
		if ok && c.cfg.Budget != nil {
			if berr := c.cfg.Budget.Allow(ctx, q.Registry, c.cfg.Upstream.Account(q.Registry), false); berr != nil {
				if served, serr := c.serveStoredManifest(w, r, q, rec.Digest, staleReason(berr)); served || serr != nil {
					c.metrics.stale.WithLabelValues(staleLabel(berr)).Inc()
					return resultStale, serr
				}
			}
		}
		writeManifestHeaders(w, desc.Digest, desc.MediaType, desc.Size)
		w.WriteHeader(http.StatusOK)
		return resultMiss, nil
	}
	qd := q
	qd.what = "tag " + q.Reference()
	qd.Digest, qd.Tag = desc.Digest, ""
	_, err = c.serveManifestDigest(w, r, qd, !ok)
	if err == nil {
		c.recordTag(ctx, q, next)
		return resultMiss, nil
	}
	if ok {
		// The tag moved upstream but the new content cannot be fetched now
		// (budget, rate limit, outage): the old content is better than nothing.
		if served, serr := c.serveStoredManifest(w, r, q, rec.Digest, staleReason(err)); served || serr != nil {
			c.metrics.stale.WithLabelValues(staleLabel(err)).Inc()
			return resultStale, serr
		}
	}
	return "", err
}

func (c *Cache) recordTag(ctx context.Context, q req, rec tagRecord) {
	if err := c.store.putTag(ctx, q.Registry, q.repo, q.Tag, rec); err != nil {
		c.cfg.Logger.WarnContext(ctx, "could not record tag", "ref", q.Reference(), "err", err)
	}
}

func staleLabel(err error) string {
	switch {
	case errors.Is(err, budget.ErrExhausted), upstream.IsRateLimited(err):
		return "rate_limited"
	case errors.Is(err, context.DeadlineExceeded):
		return "timeout"
	default:
		return "unavailable"
	}
}

func staleReason(err error) string {
	switch staleLabel(err) {
	case "rate_limited":
		return "upstream rate limit reached"
	case "timeout":
		return "upstream too slow"
	default:
		return "upstream unavailable"
	}
}

// serveStoredManifest serves manifest d from storage if it is there. A
// non-empty stale reason adds a Warning header.
func (c *Cache) serveStoredManifest(w http.ResponseWriter, r *http.Request, q req, d digest.Digest, stale string) (bool, error) {
	b, mt, ok, err := c.store.getManifest(r.Context(), q.Registry, q.repo, d)
	if err != nil || !ok {
		return false, err
	}
	if stale != "" {
		w.Header().Set("Warning", fmt.Sprintf(staleWarning, stale))
	}
	writeManifestHeaders(w, d, mt, int64(len(b)))
	c.evict.touch(d)
	w.WriteHeader(http.StatusOK)
	if !q.head {
		_, _ = w.Write(b)
		c.metrics.served.Add(float64(len(b)))
	}
	return true, nil
}

func writeManifestHeaders(w http.ResponseWriter, d digest.Digest, mt string, size int64) {
	h := w.Header()
	if mt == "" {
		mt = "application/vnd.oci.image.manifest.v1+json"
	}
	h.Set("Content-Type", mt)
	h.Set("Docker-Content-Digest", d.String())
	h.Set("Etag", `"`+d.String()+`"`)
	h.Set("Content-Length", strconv.FormatInt(size, 10))
}

// serveManifestDigest serves a manifest by digest: storage, else one
// counted upstream GET shared by every concurrent caller.
func (c *Cache) serveManifestDigest(w http.ResponseWriter, r *http.Request, q req, cold bool) (string, error) {
	ctx := r.Context()
	if served, err := c.serveStoredManifest(w, r, q, q.Digest, ""); served || err != nil {
		return resultHit, err
	}
	if q.head {
		hctx, cancel := context.WithTimeout(ctx, c.cfg.UpstreamTimeout)
		desc, err := c.cfg.Upstream.HeadManifest(hctx, q.Registry, q.repo, q.Digest.String())
		cancel()
		if err != nil {
			return "", c.upstreamError(err, q.describe())
		}
		writeManifestHeaders(w, q.Digest, desc.MediaType, desc.Size)
		w.WriteHeader(http.StatusOK)
		return resultMiss, nil
	}
	if c.cfg.Budget != nil {
		// A cheap early answer; the upstream client's Take is the atomic gate.
		acct := c.cfg.Upstream.Account(q.Registry)
		if err := c.cfg.Budget.Allow(ctx, q.Registry, acct, cold); err != nil {
			return "", c.upstreamError(err, q.describe())
		}
	}
	var mt string
	job := flight.Job{
		Fetch: func(ctx context.Context, w io.Writer) error {
			fctx, cancel := context.WithTimeout(budget.WithCold(ctx, cold), c.cfg.UpstreamTimeout)
			defer cancel()
			b, desc, err := c.cfg.Upstream.GetManifest(fctx, q.Registry, q.repo, q.Digest.String())
			if err != nil {
				return err
			}
			if desc.Digest != q.Digest {
				return fmt.Errorf("upstream manifest %s: %w", q.Digest, oci.ErrDigestMismatch)
			}
			mt = desc.MediaType
			setSize(w, int64(len(b)))
			_, err = w.Write(b)
			return err
		},
		Commit: func(ctx context.Context, spool *os.File) error {
			b, err := io.ReadAll(io.LimitReader(spool, oci.MaxManifestSize+1))
			if err != nil {
				return err
			}
			sm, err := c.store.putManifest(ctx, q.Registry, q.repo, q.Digest, mt, b)
			if err != nil {
				c.cfg.Logger.WarnContext(ctx, "manifest not cached", "digest", q.Digest, "err", err)
				return err
			}
			c.evict.manifestStored(sm.repo, q.Digest, sm.refs)
			return nil
		},
		Committed: func(ctx context.Context) (bool, error) {
			_, _, ok, err := c.store.getManifest(ctx, q.Registry, q.repo, q.Digest)
			return ok, err
		},
	}
	res, err := c.cfg.Flight.Do(ctx, "manifest:"+q.Registry+"/"+q.repo+"@"+q.Digest.String(), job)
	if err != nil {
		return "", c.upstreamError(err, q.describe())
	}
	if res.Elsewhere {
		if served, err := c.serveStoredManifest(w, r, q, q.Digest, ""); served || err != nil {
			return resultHit, err
		}
		return "", oci.ErrManifestUnknown
	}
	defer res.Body.Close()
	b, err := io.ReadAll(io.LimitReader(res.Body, oci.MaxManifestSize+1))
	if err != nil {
		return "", c.upstreamError(err, q.describe())
	}
	if q.Digest.Algorithm().FromBytes(b) != q.Digest {
		return "", c.upstreamError(oci.ErrDigestMismatch, q.describe())
	}
	if mt == "" || !oci.IsManifestMediaType(mt) {
		mt = oci.SniffManifestMediaType(b)
	}
	// The flight commits in the background; store it now as well, so the
	// next request (a tag revalidation, a stale fallback) finds it. A second
	// put of the same bytes is harmless.
	if _, _, held, err := c.store.getManifest(ctx, q.Registry, q.repo, q.Digest); err == nil && !held {
		if sm, err := c.store.putManifest(ctx, q.Registry, q.repo, q.Digest, mt, b); err != nil {
			c.cfg.Logger.WarnContext(ctx, "manifest not cached", "digest", q.Digest, "err", err)
		} else {
			c.evict.manifestStored(sm.repo, q.Digest, sm.refs)
		}
	}
	writeManifestHeaders(w, q.Digest, mt, int64(len(b)))
	w.WriteHeader(http.StatusOK)
	_, _ = w.Write(b)
	c.metrics.served.Add(float64(len(b)))
	c.metrics.upstreamBytes.Add(float64(len(b)))
	return resultMiss, nil
}

// setSize tells the flight the total size before the first byte, so every
// waiter can send Content-Length.
func setSize(w io.Writer, n int64) {
	if s, ok := w.(interface{ SetSize(int64) }); ok {
		s.SetSize(n)
	}
}

// serveBlob serves a blob: storage (with Range), else one upstream fetch,
// streamed to every waiter as it arrives and verified before it is stored.
func (c *Cache) serveBlob(w http.ResponseWriter, r *http.Request, q req) (string, error) {
	ctx := r.Context()
	if node := r.Header.Get(oci.HerdPeerHeader); node != "" && c.cfg.Herd != nil && !q.head {
		if !oci.ValidPeerID(node) {
			return "", oci.Errorf(http.StatusBadRequest, oci.CodeUnsupported, "%s is not a peer ID", oci.HerdPeerHeader)
		}
		// A node resuming a transfer asks with HerdDirectHeader. A range
		// without it is a chunk of containerd's chunked fetch, which the
		// node's receivers serve as well as the whole blob.
		force := r.Header.Get(oci.HerdDirectHeader) != ""
		me := herd.Member{ID: node, Addrs: strings.Join(oci.HerdAddrs(r.Header.Get(oci.HerdAddrsHeader)), ",")}
		receivers, done := c.cfg.Herd.Join(q.Digest.String(), me, force)
		if len(receivers) > 0 {
			ids, addrs := make([]string, len(receivers)), []string(nil)
			for i, m := range receivers {
				ids[i] = m.ID
				for _, a := range oci.HerdAddrs(m.Addrs) {
					addrs = append(addrs, a+"/p2p/"+m.ID)
				}
			}
			w.Header().Set(oci.HerdReceiversHeader, strings.Join(ids, ","))
			if len(addrs) > 0 {
				w.Header().Set(oci.HerdReceiverAddrsHeader, strings.Join(addrs, ","))
			}
			oci.WriteError(w, r, oci.Errorf(oci.HerdRedirectStatus, oci.CodeUnavailable, "blob %s: ask the nodes receiving it", q.Digest))
			return resultRedirected, nil
		}
		cw := &countingWriter{ResponseWriter: w}
		defer func() { done(cw.n) }()
		w = cw
	}
	if desc, ok, err := c.store.statBlob(ctx, q.Digest); err != nil {
		return "", err
	} else if ok {
		return resultHit, c.serveStoredBlob(w, r, q.Digest, desc.Size)
	}
	job := flight.Job{
		Fetch: func(ctx context.Context, w io.Writer) error {
			rc, size, err := c.cfg.Upstream.GetBlob(ctx, q.Registry, q.repo, q.Digest, 0)
			if err != nil {
				return err
			}
			body := oci.NewIdleReader(rc, c.cfg.UpstreamIdleTimeout)
			defer body.Close()
			setSize(w, size)
			vr, err := oci.NewVerifyingReader(body, q.Digest, size)
			if err != nil {
				return err
			}
			n, err := io.Copy(w, vr)
			c.metrics.upstreamBytes.Add(float64(n))
			if err != nil {
				if errors.Is(err, oci.ErrDigestMismatch) {
					c.cfg.Logger.WarnContext(ctx, "upstream sent bytes that do not match the digest; nothing stored", "registry", q.Registry, "repo", q.repo, "digest", q.Digest)
				}
				return fmt.Errorf("fetch blob %s: %w", q.Digest, err)
			}
			return nil
		},
		Relay: func(ctx context.Context, w io.Writer, from string) error {
			return c.relayBlob(ctx, w, from, q)
		},
		Commit: func(ctx context.Context, spool *os.File) error {
			size, err := c.store.commitBlob(ctx, q.Digest, spool)
			if err != nil {
				return err
			}
			c.evict.blobStored(q.Digest, size)
			return nil
		},
		Committed: func(ctx context.Context) (bool, error) {
			_, ok, err := c.store.statBlob(ctx, q.Digest)
			return ok, err
		},
	}
	res, err := c.cfg.Flight.Do(ctx, "blob:"+q.Digest.String(), job)
	if errors.Is(err, flight.ErrNoSpace) {
		return resultMiss, c.passthrough(w, r, q)
	}
	if err != nil {
		return "", c.upstreamError(err, "blob "+q.Digest.String())
	}
	if res.Elsewhere {
		desc, ok, err := c.store.statBlob(ctx, q.Digest)
		if err != nil {
			return "", err
		}
		if !ok {
			return "", oci.ErrBlobUnknown
		}
		return resultHit, c.serveStoredBlob(w, r, q.Digest, desc.Size)
	}
	defer res.Body.Close()
	err = c.streamBlob(w, r, q, res.Body)
	if errors.Is(err, flight.ErrNoSpace) {
		// Nothing was written yet: the fetch learned before its first byte
		// that the blob does not fit the disk.
		return resultMiss, c.passthrough(w, r, q)
	}
	return resultMiss, err
}

// passthrough serves a blob straight from upstream, verified but not
// cached, when the spool's disk has no room for it: the pull completes,
// at the cost of an upstream GET per request until space is freed.
func (c *Cache) passthrough(w http.ResponseWriter, r *http.Request, q req) error {
	ctx := r.Context()
	c.metrics.passthrough.Inc()
	c.cfg.Logger.ErrorContext(ctx, "cache storage full: serving the blob straight from upstream, not cached; free space or lower --max-size",
		"digest", q.Digest)
	rc, size, err := c.cfg.Upstream.GetBlob(ctx, q.Registry, q.repo, q.Digest, 0)
	if err != nil {
		return c.upstreamError(err, "blob "+q.Digest.String())
	}
	body := oci.NewIdleReader(rc, c.cfg.UpstreamIdleTimeout)
	defer body.Close()
	vr, err := oci.NewVerifyingReader(body, q.Digest, size)
	if err != nil {
		return err
	}
	return c.streamBlob(w, r, q, directBody{Reader: &countingReader{r: vr, n: c.metrics.upstreamBytes}, size: size})
}

// directBody is an upstream body in the shape streamBlob reads.
type directBody struct {
	io.Reader
	size int64
}

func (directBody) Close() error                          { return nil }
func (d directBody) Size(context.Context) (int64, error) { return d.size, nil }
func (d directBody) FinalSize(context.Context) (int64, error) {
	if d.size < 0 {
		return 0, oci.Errorf(http.StatusServiceUnavailable, oci.CodeUnavailable, "cache storage is full and the upstream sends this blob without a length; a range of it cannot be served now")
	}
	return d.size, nil
}

// countingReader adds what it reads to a counter.
type countingReader struct {
	r io.Reader
	n prometheus.Counter
}

func (c *countingReader) Read(p []byte) (int, error) {
	k, err := c.r.Read(p)
	c.n.Add(float64(k))
	return k, err
}

// ReplicaHeader marks a request one replica relays to another.
const ReplicaHeader = "X-Shoal-Replica"

// relayBlob streams blob q from the replica at from, which holds its lease
// and is fetching it, into w, verifying it as an upstream fetch is.
func (c *Cache) relayBlob(ctx context.Context, w io.Writer, from string, q req) error {
	u := strings.TrimSuffix(from, "/") + "/v2/" + q.Name + "/blobs/" + q.Digest.String() + "?ns=" + url.QueryEscape(q.Registry)
	hr, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return fmt.Errorf("relay request: %w", err)
	}
	hr.Header.Set(ReplicaHeader, "1")
	resp, err := c.cfg.ReplicaClient.Do(hr)
	if err != nil {
		return fmt.Errorf("relay from %s: %w", from, err)
	}
	body := oci.NewIdleReader(resp.Body, c.cfg.UpstreamIdleTimeout)
	defer body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("relay from %s: status %d", from, resp.StatusCode)
	}
	setSize(w, resp.ContentLength)
	vr, err := oci.NewVerifyingReader(body, q.Digest, resp.ContentLength)
	if err != nil {
		return err
	}
	if _, err := io.Copy(w, vr); err != nil {
		return fmt.Errorf("relay blob %s from %s: %w", q.Digest, from, err)
	}
	return nil
}

// sizer is the flight body's view of the total size the fetch announced.
type sizer interface {
	// Size is the size announced before the first byte, or -1.
	Size(ctx context.Context) (int64, error)
	// FinalSize waits, when no size was announced, for the fetch to end.
	FinalSize(ctx context.Context) (int64, error)
}

// streamBlob writes a blob from a flight in progress. The size comes from
// the fetch before the first byte; Range requests skip into the stream.
func (c *Cache) streamBlob(w http.ResponseWriter, r *http.Request, q req, body io.ReadCloser) error {
	ctx := r.Context()
	sz, ok := body.(sizer)
	if !ok {
		return errors.New("flight body does not report a size")
	}
	size, err := sz.Size(ctx)
	if err != nil {
		return c.upstreamError(err, "blob "+q.Digest.String())
	}
	if size < 0 {
		// The upstream sent no length (chunked, as Artifactory, Nexus and
		// many proxies do). A whole GET streams without Content-Length; a
		// Range or a HEAD needs the size, which only the end of the fetch
		// tells.
		if r.Header.Get("Range") == "" && !q.head {
			return c.streamUnsized(w, r, q, body)
		}
		if size, err = sz.FinalSize(ctx); err != nil {
			return c.upstreamError(err, "blob "+q.Digest.String())
		}
	}
	br, ranged, err := oci.ParseRange(r.Header.Get("Range"), size)
	if err != nil {
		return err
	}
	h := w.Header()
	h.Set("Content-Type", "application/octet-stream")
	h.Set("Docker-Content-Digest", q.Digest.String())
	h.Set("Etag", `"`+q.Digest.String()+`"`)
	h.Set("Accept-Ranges", "bytes")
	status, length := http.StatusOK, size
	if ranged {
		status, length = http.StatusPartialContent, br.Length()
		h.Set("Content-Range", br.ContentRange(size))
		if _, err := io.CopyN(io.Discard, body, br.Start); err != nil {
			return c.upstreamError(err, "blob "+q.Digest.String())
		}
	}
	h.Set("Content-Length", strconv.FormatInt(length, 10))
	if q.head {
		w.WriteHeader(status)
		return nil
	}
	// Read the first chunk before committing to a 200, so a fetch that fails
	// at once still gets a proper error response.
	first := make([]byte, 32<<10)
	n, rerr := io.ReadFull(body, first[:min(int64(len(first)), length)])
	if rerr != nil && !errors.Is(rerr, io.EOF) && !errors.Is(rerr, io.ErrUnexpectedEOF) {
		return c.upstreamError(rerr, "blob "+q.Digest.String())
	}
	w.WriteHeader(status)
	// Everything but the last byte goes out as it arrives. The last byte waits
	// until the whole fetch has ended and its digest checked out, so a client
	// never receives a complete body made of bad bytes.
	src := io.MultiReader(bytes.NewReader(first[:n]), body)
	written, err := io.CopyN(w, src, max(length-1, 0))
	var last [1]byte
	if err == nil && length > 0 {
		_, err = io.ReadFull(src, last[:])
	}
	if err == nil {
		_, err = io.Copy(io.Discard, body) // the rest of a ranged read; returns the fetch's verdict
	}
	if err == nil && length > 0 {
		var k int
		k, err = w.Write(last[:])
		written += int64(k)
	}
	c.metrics.served.Add(float64(written))
	if err != nil || written != length {
		// Headers are out: cut the connection so the client sees a failure,
		// never a short or unverified body that looks complete.
		c.cfg.Logger.WarnContext(ctx, "blob stream aborted", "digest", q.Digest, "written", written, "of", length, "err", err)
		panic(http.ErrAbortHandler)
	}
	return nil
}

// streamUnsized writes a whole blob of unknown size from a flight in
// progress, without Content-Length. As in streamBlob, the last byte waits
// for the fetch's verdict, so a client never sees a complete body of bad
// bytes: one byte is always held back until the flight ends.
func (c *Cache) streamUnsized(w http.ResponseWriter, r *http.Request, q req, body io.Reader) error {
	ctx := r.Context()
	buf := make([]byte, 32<<10)
	n, rerr := io.ReadAtLeast(body, buf, 1)
	if rerr != nil && !errors.Is(rerr, io.EOF) {
		return c.upstreamError(rerr, "blob "+q.Digest.String())
	}
	h := w.Header()
	h.Set("Content-Type", "application/octet-stream")
	h.Set("Docker-Content-Digest", q.Digest.String())
	h.Set("Etag", `"`+q.Digest.String()+`"`)
	h.Set("Accept-Ranges", "bytes")
	w.WriteHeader(http.StatusOK)
	var written int64
	var err error
	held := -1 // the byte held back, -1 for none
	for n > 0 {
		if held >= 0 {
			if _, err = w.Write([]byte{byte(held)}); err != nil {
				break
			}
			written++
		}
		held = int(buf[n-1])
		if n > 1 {
			var k int
			k, err = w.Write(buf[:n-1])
			written += int64(k)
			if err != nil {
				break
			}
		}
		n, err = body.Read(buf)
		if errors.Is(err, io.EOF) {
			err = nil
			if n == 0 {
				break
			}
		} else if err != nil {
			break
		}
	}
	if err == nil && held >= 0 {
		var k int
		k, err = w.Write([]byte{byte(held)})
		written += int64(k)
	}
	c.metrics.served.Add(float64(written))
	if err != nil {
		c.cfg.Logger.WarnContext(ctx, "blob stream aborted", "digest", q.Digest, "written", written, "err", err)
		panic(http.ErrAbortHandler)
	}
	return nil
}

func (c *Cache) serveStoredBlob(w http.ResponseWriter, r *http.Request, d digest.Digest, size int64) error {
	if _, _, err := oci.ParseRange(r.Header.Get("Range"), size); err != nil {
		return err
	}
	f, err := c.store.openBlob(r.Context(), d)
	if err != nil {
		return err
	}
	defer f.Close()
	h := w.Header()
	h.Set("Content-Type", "application/octet-stream")
	h.Set("Docker-Content-Digest", d.String())
	h.Set("Etag", `"`+d.String()+`"`)
	h.Set("Accept-Ranges", "bytes")
	defer c.evict.hold(d)()
	cw := &countingWriter{ResponseWriter: w}
	http.ServeContent(cw, r, "", time.Time{}, f)
	c.metrics.served.Add(float64(cw.n))
	return nil
}

type countingWriter struct {
	http.ResponseWriter
	n int64
}

func (w *countingWriter) Write(p []byte) (int, error) {
	n, err := w.ResponseWriter.Write(p)
	w.n += int64(n)
	return n, err
}

// upstreamError turns an upstream or budget failure into the client's OCI
// error: 404 for unknown content, 429 when rate-limited (with Retry-After),
// 503 when upstream is unreachable, 502 for bad bytes. The message names the
// registry and what failed, never a credential.
func (c *Cache) upstreamError(err error, what string) error {
	var ex *budget.ExhaustedError
	var ue *upstream.Error
	switch {
	case errors.As(err, &ex) && ex.Reason == budget.ClientShareReason:
		e := oci.Errorf(http.StatusTooManyRequests, oci.CodeTooManyRequests,
			"%s is not cached and this client (node) has caused %d of the %d counted pulls of %s it may cause in this window (the rest of the budget is kept for other nodes); retry later",
			what, ex.ClientUsed, ex.ClientLimit, ex.Upstream)
		if ex.RetryAfter > 0 {
			e.Header = http.Header{"Retry-After": {strconv.Itoa(int(ex.RetryAfter.Seconds()) + 1)}}
		}
		return e.Wrap(err)
	case errors.As(err, &ex):
		e := oci.Errorf(http.StatusTooManyRequests, oci.CodeTooManyRequests,
			"%s is not cached and the upstream pull budget of %s is spent (%s); retry later", what, ex.Upstream, ex.Reason)
		if ex.RetryAfter > 0 {
			e.Header = http.Header{"Retry-After": {strconv.Itoa(int(ex.RetryAfter.Seconds()) + 1)}}
		}
		return e.Wrap(err)
	case upstream.IsNotFound(err):
		if what[:4] == "blob" {
			return oci.ErrBlobUnknown.Wrap(err)
		}
		return oci.ErrManifestUnknown.Wrap(err)
	case upstream.IsRateLimited(err):
		e := oci.Errorf(http.StatusTooManyRequests, oci.CodeTooManyRequests, "%s is not cached and the upstream registry is rate-limiting this cache; retry later", what)
		if errors.As(err, &ue) && ue.RetryAfter > 0 {
			e.Header = http.Header{"Retry-After": {strconv.Itoa(int(ue.RetryAfter.Seconds()) + 1)}}
		}
		return e.Wrap(err)
	case errors.Is(err, oci.ErrDigestMismatch):
		return oci.Errorf(http.StatusBadGateway, oci.CodeDigestInvalid, "%s: upstream sent content that does not match its digest; nothing was stored", what).Wrap(err)
	case errors.As(err, &ue) && ue.Status == http.StatusUnauthorized, errors.As(err, &ue) && ue.Status == http.StatusForbidden:
		return oci.Errorf(http.StatusBadGateway, oci.CodeDenied, "%s: the upstream registry refused this cache's credentials", what).Wrap(err)
	case upstream.IsUnavailable(err), errors.Is(err, context.DeadlineExceeded):
		return oci.Errorf(http.StatusServiceUnavailable, oci.CodeUnavailable, "%s is not cached and the upstream registry is unavailable; retry later", what).Wrap(err)
	}
	return oci.Errorf(http.StatusBadGateway, oci.CodeUnavailable, "%s: upstream request failed", what).Wrap(err)
}

func (c *Cache) freshness(registry string) time.Duration {
	if d, ok := c.cfg.TagFreshnessBy[registry]; ok {
		return d
	}
	return c.cfg.TagFreshness
}
