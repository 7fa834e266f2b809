package hub

import (
	"compress/gzip"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"time"

	"github.com/opencontainers/go-digest"
)

type routeKind int

const (
	routeBase routeKind = iota
	routeManifest
	routeBlob
	routeUpload
	routeOther // tags/list, referrers: repository-scoped, uncounted
	routeDenied
)

// parse splits a /v2/ path into its kind, repository and reference.
func parse(path string) (kind routeKind, repo, ref string) {
	if path == "/v2/" || path == "/v2" {
		return routeBase, "", ""
	}
	rest, ok := strings.CutPrefix(path, "/v2/")
	if !ok {
		return routeDenied, "", ""
	}
	if i := strings.Index(rest, "/blobs/uploads"); i > 0 {
		return routeUpload, rest[:i], ""
	}
	for _, s := range []struct {
		sep  string
		kind routeKind
	}{{"/manifests/", routeManifest}, {"/blobs/", routeBlob}, {"/tags/", routeOther}, {"/referrers/", routeOther}} {
		if i := strings.LastIndex(rest, s.sep); i > 0 {
			return s.kind, rest[:i], rest[i+len(s.sep):]
		}
	}
	return routeDenied, "", ""
}

// ServeHTTP is the Docker-Hub-like front: faults, tokens, auth, rate limits
// and counters, then the real registry.
func (h *Hub) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	h.counts.requests.Add(1)
	if d := time.Duration(h.latency.Load()); d > 0 {
		if err := sleep(r.Context(), d); err != nil {
			return
		}
	}
	if h.drop.Load() {
		h.counts.outage.Add(1)
		if hj, ok := w.(http.Hijacker); ok {
			if conn, _, err := hj.Hijack(); err == nil {
				_ = conn.Close()
				return
			}
		}
		panic(http.ErrAbortHandler)
	}
	if h.outage.Load() {
		h.counts.outage.Add(1)
		writeError(w, r, http.StatusServiceUnavailable, "UNAVAILABLE", "service unavailable")
		return
	}
	if r.URL.Path == "/token" {
		h.serveToken(throttled(w, r, h, false), r)
		return
	}

	kind, repo, ref := parse(r.URL.Path)
	read := r.Method == http.MethodGet || r.Method == http.MethodHead
	switch {
	case kind == routeDenied:
		writeError(w, r, http.StatusNotFound, "NAME_UNKNOWN", "unknown route")
		return
	case kind == routeUpload || !read:
		// Pushes go through the admin listener only; tokens never grant push.
		h.challenge(w, r, repo, "pull,push")
		return
	}
	tok, ok := h.authorize(r, repo)
	if !ok {
		h.challenge(w, r, repo, "pull")
		return
	}

	switch kind {
	case routeManifest:
		if !h.limitManifest(w, r, tok, repo, ref) {
			return
		}
	case routeBlob:
		dgst := digest.Digest(ref)
		if r.Method == http.MethodHead {
			h.counts.blobHEAD.Add(1)
			break
		}
		h.counts.blobGET.Add(1)
		h.mu.Lock()
		h.blobGETs[dgst]++
		bad := h.corrupt[dgst]
		h.mu.Unlock()
		fw := throttled(w, r, h, bad)
		fw.blob(r)
		h.app.ServeHTTP(fw, r)
		fw.close()
		return
	}
	h.app.ServeHTTP(throttled(w, r, h, false), r)
}

// limitManifest counts a manifest request against the token's bucket and sets
// the rate-limit headers. It answers 429 itself and returns false when a GET
// finds the bucket empty.
func (h *Hub) limitManifest(w http.ResponseWriter, r *http.Request, tok token, repo, ref string) bool {
	source, limit := clientIP(r), h.cfg.anonLimit
	if tok.account != "" {
		source, limit = tok.account, h.cfg.accounts[tok.account].limit
	}
	get := r.Method == http.MethodGet
	now := time.Now()

	h.mu.Lock()
	b := h.buckets[source]
	if b == nil || !now.Before(b.start.Add(h.cfg.window)) {
		b = &bucket{start: now}
		h.buckets[source] = b
	}
	admitted := !get || limit < 0 || b.used < limit
	if get && admitted {
		b.used++
		h.pulls[source]++
		h.manifestGETs[repo+"|"+ref]++
	}
	remaining := max(limit-b.used, 0)
	h.mu.Unlock()

	if get && admitted {
		h.counts.manifestGET.Add(1)
	} else if !get {
		h.counts.manifestHEAD.Add(1)
	}
	if limit >= 0 {
		win := int64(h.cfg.window / time.Second)
		w.Header().Set("ratelimit-limit", fmt.Sprintf("%d;w=%d", limit, win))
		w.Header().Set("ratelimit-remaining", fmt.Sprintf("%d;w=%d", remaining, win))
		w.Header().Set("docker-ratelimit-source", source)
	}
	if !admitted {
		h.counts.throttled.Add(1)
		writeError(w, r, http.StatusTooManyRequests, "TOOMANYREQUESTS",
			"You have reached your pull rate limit. You may increase the limit by authenticating and upgrading: https://www.docker.com/increase-rate-limit")
		return false
	}
	return true
}

// faultWriter throttles the body to the hub's bandwidth and, for corrupted
// blobs, flips every byte of a successful body.
type faultWriter struct {
	http.ResponseWriter
	ctx     context.Context
	hub     *Hub
	corrupt bool
	status  int
	start   time.Time
	written int64
	// Blob GET switches (see blob).
	chunked, gzip bool
	stallAt       int64 // -1: never
	gz            *gzip.Writer
}

func throttled(w http.ResponseWriter, r *http.Request, h *Hub, corrupt bool) *faultWriter {
	return &faultWriter{ResponseWriter: w, ctx: r.Context(), hub: h, corrupt: corrupt, stallAt: -1}
}

// blob arms the blob-GET switches: chunked, gzip and stall.
func (f *faultWriter) blob(r *http.Request) {
	f.chunked = f.hub.chunked.Load()
	f.gzip = f.hub.gzipped.Load() && strings.Contains(r.Header.Get("Accept-Encoding"), "gzip")
	f.stallAt = f.hub.stall.Load()
}

func (f *faultWriter) WriteHeader(status int) {
	if f.status == 0 {
		f.status = status
	}
	if status == http.StatusOK || status == http.StatusPartialContent {
		if f.chunked || f.gzip {
			f.Header().Del("Content-Length")
		}
		if f.gzip {
			f.Header().Set("Content-Encoding", "gzip")
			f.gz = gzip.NewWriter(writerFunc(f.write))
		}
	}
	f.ResponseWriter.WriteHeader(status)
}

// close ends a gzip body.
func (f *faultWriter) close() {
	if f.gz != nil {
		_ = f.gz.Close()
	}
}

type writerFunc func([]byte) (int, error)

func (w writerFunc) Write(p []byte) (int, error) { return w(p) }

func (f *faultWriter) Write(p []byte) (int, error) {
	if f.status == 0 {
		f.WriteHeader(http.StatusOK)
	}
	if f.gz != nil {
		return f.gz.Write(p)
	}
	return f.write(p)
}

func (f *faultWriter) write(p []byte) (int, error) {
	if f.stallAt >= 0 && (f.status == http.StatusOK || f.status == http.StatusPartialContent) {
		if left := f.stallAt - f.written; int64(len(p)) > left {
			m, _ := f.ResponseWriter.Write(p[:max(left, 0)])
			f.written += int64(m)
			f.Flush()
			<-f.ctx.Done() // stall until the client gives up
			return m, f.ctx.Err()
		}
	}
	if f.chunked {
		// Flush after every write so the server never buffers a whole
		// small body and sends its length after all.
		defer f.Flush()
	}
	if f.corrupt && (f.status == http.StatusOK || f.status == http.StatusPartialContent) {
		q := make([]byte, len(p))
		for i, c := range p {
			q[i] = ^c
		}
		p = q
	}
	n := 0
	for n < len(p) {
		rate := f.hub.bandwidth.Load()
		chunk := len(p) - n
		if rate > 0 {
			// Small chunks keep the flow smooth: about 50 per second.
			chunk = min(chunk, int(max(rate/50, 512)))
		}
		m, err := f.ResponseWriter.Write(p[n : n+chunk])
		n += m
		if err != nil {
			return n, err
		}
		f.written += int64(m)
		if rate <= 0 {
			continue
		}
		if f.start.IsZero() {
			f.start = time.Now()
		}
		if fl, ok := f.ResponseWriter.(http.Flusher); ok {
			fl.Flush()
		}
		due := time.Duration(float64(f.written) / float64(rate) * float64(time.Second))
		if wait := due - time.Since(f.start); wait > 0 {
			if err := sleep(f.ctx, wait); err != nil {
				return n, err
			}
		}
	}
	return n, nil
}

// Flush implements http.Flusher.
func (f *faultWriter) Flush() {
	if fl, ok := f.ResponseWriter.(http.Flusher); ok {
		fl.Flush()
	}
}

// Unwrap lets http.ResponseController reach the underlying writer.
func (f *faultWriter) Unwrap() http.ResponseWriter { return f.ResponseWriter }

func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func jsonString(s string) string {
	b, _ := json.Marshal(s)
	return string(b)
}
