// Package hub is a Docker-Hub-like upstream registry for shoal's tests.
//
// A Hub is a real distribution v3 registry (filesystem storage in a temporary
// directory) behind a front handler that behaves like Docker Hub: bearer
// tokens from /token on the same server, per-account pull rate limits counted
// on manifest GETs only, the ratelimit-* headers, and 429 TOOMANYREQUESTS when
// a bucket is empty. Switches inject faults (outage, dropped connections,
// latency, bandwidth limits, corrupted blobs) and counters report what reached
// the upstream. Content is written with Push, PushIndex and Retag through a
// separate admin listener, so it never touches the limits or the counters.
//
// Everything listens on 127.0.0.1 on random ports and stops in t.Cleanup.
package hub

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/distribution/distribution/v3/configuration"
	"github.com/distribution/distribution/v3/registry/handlers"
	_ "github.com/distribution/distribution/v3/registry/storage/driver/filesystem" // registers the "filesystem" driver
	"github.com/opencontainers/go-digest"
)

// Service is the token service name the hub announces and expects, as
// Docker Hub does.
const Service = "registry.docker.io"

// Unlimited as a limit means the account has no pull limit: its responses
// carry no ratelimit-* headers, like a paid Docker Hub plan.
const Unlimited = -1

// Defaults taken from Docker Hub.
const (
	DefaultAnonymousLimit = 100
	DefaultWindow         = 6 * time.Hour
	DefaultTokenTTL       = 300 * time.Second
)

// Option configures a Hub.
type Option func(*config)

type account struct {
	password string
	limit    int
}

type config struct {
	accounts  map[string]account
	anonLimit int
	window    time.Duration
	tokenTTL  time.Duration
	listen    string
}

// WithAccount adds an account that may log in at /token with basic auth.
// limit is its pulls per window, or Unlimited.
func WithAccount(user, pass string, limit int) Option {
	return func(c *config) { c.accounts[user] = account{password: pass, limit: limit} }
}

// WithAnonymousLimit sets the pulls per window for anonymous clients, which
// are bucketed by client IP (default 100). Unlimited removes the limit.
func WithAnonymousLimit(n int) Option {
	return func(c *config) { c.anonLimit = n }
}

// WithWindow sets the rate-limit window (default 6h). The window starts at a
// bucket's first counted pull; the bucket refills when it ends.
func WithWindow(d time.Duration) Option {
	return func(c *config) { c.window = d }
}

// WithTokenTTL sets the lifetime of issued tokens (default 300s). It is
// reported as expires_in, in whole seconds (at least 1).
func WithTokenTTL(d time.Duration) Option {
	return func(c *config) { c.tokenTTL = d }
}

// WithListenAddr serves the registry (the front, not the admin side) on
// addr, "IP:0", instead of 127.0.0.1: an address of the test's own network
// namespaces, for clients that run inside them.
func WithListenAddr(addr string) Option {
	return func(c *config) { c.listen = addr }
}

// Counts is a snapshot of the hub's request counters. Admin traffic (Push,
// PushIndex, Retag) is never counted.
type Counts struct {
	// Requests is every request the front handler received.
	Requests int64
	// ManifestGET counts manifest GETs that were admitted (and counted
	// against a rate-limit bucket), whatever the registry answered.
	ManifestGET int64
	// ManifestHEAD counts authorized manifest HEADs.
	ManifestHEAD int64
	// BlobGET and BlobHEAD count authorized blob requests.
	BlobGET  int64
	BlobHEAD int64
	// TokenRequests counts every request to /token, successful or not.
	TokenRequests int64
	// Throttled counts manifest GETs refused with 429 TOOMANYREQUESTS.
	Throttled int64
	// Unauthorized counts registry requests answered 401.
	Unauthorized int64
	// Outage counts requests refused (503 or dropped) by SetOutage or
	// SetDropConnections.
	Outage int64
}

type counters struct {
	requests, manifestGET, manifestHEAD, blobGET, blobHEAD atomic.Int64
	tokenRequests, throttled, unauthorized, outage         atomic.Int64
}

type bucket struct {
	used  int
	start time.Time
}

// Hub is a running Docker-Hub-like registry. All methods are safe for
// concurrent use.
type Hub struct {
	cfg   config
	app   *handlers.App
	front *httptest.Server
	admin *httptest.Server
	realm string

	outage    atomic.Bool
	drop      atomic.Bool
	latency   atomic.Int64 // nanoseconds
	bandwidth atomic.Int64 // bytes per second, 0 = unthrottled
	chunked   atomic.Bool  // blob GETs without Content-Length
	gzipped   atomic.Bool  // blob GETs gzip-encoded when the client accepts it
	stall     atomic.Int64 // blob GETs stall after this many body bytes; -1 = never
	counts    counters

	mu           sync.Mutex
	tokens       map[string]token
	buckets      map[string]*bucket
	pulls        map[string]int64
	blobGETs     map[digest.Digest]int64
	manifestGETs map[string]int64
	corrupt      map[digest.Digest]bool
	sawBasic     map[string]bool
}

// Start runs a hub until the end of the test.
func Start(t testing.TB, opts ...Option) *Hub {
	t.Helper()
	cfg := config{
		accounts:  map[string]account{},
		anonLimit: DefaultAnonymousLimit,
		window:    DefaultWindow,
		tokenTTL:  DefaultTokenTTL,
	}
	for _, o := range opts {
		o(&cfg)
	}

	dc := &configuration.Configuration{}
	dc.Log.Level = "error"
	dc.Log.AccessLog.Disabled = true
	dc.HTTP.Secret = randomHex(16)
	dc.Storage = configuration.Storage{
		"filesystem":  configuration.Parameters{"rootdirectory": t.TempDir()},
		"delete":      configuration.Parameters{"enabled": true},
		"redirect":    configuration.Parameters{"disable": true},
		"maintenance": configuration.Parameters{"uploadpurging": map[any]any{"enabled": false}},
	}
	ctx, cancel := context.WithCancel(QuietContext(context.Background()))
	app := handlers.NewApp(ctx, dc)

	h := &Hub{
		cfg:          cfg,
		app:          app,
		tokens:       map[string]token{},
		buckets:      map[string]*bucket{},
		pulls:        map[string]int64{},
		blobGETs:     map[digest.Digest]int64{},
		manifestGETs: map[string]int64{},
		corrupt:      map[digest.Digest]bool{},
		sawBasic:     map[string]bool{},
	}
	h.stall.Store(-1)
	h.front = serve(t, ctx, h, cfg.listen)
	h.admin = serve(t, ctx, app, "")
	h.realm = h.front.URL + "/token"
	t.Cleanup(func() {
		h.front.CloseClientConnections()
		h.front.Close()
		h.admin.Close()
		_ = app.Shutdown()
		cancel()
	})
	return h
}

// URL returns the hub's base URL, "http://127.0.0.1:P" (or the address
// WithListenAddr gave).
func (h *Hub) URL() string { return h.front.URL }

// Host returns the hub's "127.0.0.1:P".
func (h *Hub) Host() string { return strings.TrimPrefix(h.front.URL, "http://") }

// Ref returns "127.0.0.1:P/repo:tag" for use with clients.
func (h *Hub) Ref(repo, tag string) string { return h.Host() + "/" + repo + ":" + tag }

// Realm returns the token endpoint URL announced in challenges.
func (h *Hub) Realm() string { return h.realm }

// SetOutage makes every request (tokens included) answer 503 while on.
func (h *Hub) SetOutage(on bool) { h.outage.Store(on) }

// SetDropConnections makes the hub close every connection without answering
// while on, like a network failure.
func (h *Hub) SetDropConnections(on bool) { h.drop.Store(on) }

// SetChunkedBlobs makes blob GETs answer without Content-Length, in chunked
// transfer encoding, as Artifactory, Nexus and many proxies do.
func (h *Hub) SetChunkedBlobs(on bool) { h.chunked.Store(on) }

// SetGzipBlobs makes blob GETs answer gzip-encoded (Content-Encoding: gzip,
// no Content-Length) to clients that send Accept-Encoding: gzip.
func (h *Hub) SetGzipBlobs(on bool) { h.gzipped.Store(on) }

// SetStallBlobs makes blob GETs send their headers and the first n body
// bytes, then nothing until the client goes away. n < 0 turns it off.
func (h *Hub) SetStallBlobs(n int64) { h.stall.Store(n) }

// SetLatency delays every request by d before any header is written.
func (h *Hub) SetLatency(d time.Duration) { h.latency.Store(int64(d)) }

// SetBandwidth throttles every response body to about bytesPerSec; 0 (or
// less) removes the throttle. It applies to bodies already being written.
func (h *Hub) SetBandwidth(bytesPerSec int64) { h.bandwidth.Store(bytesPerSec) }

// CorruptBlob makes blob GETs for dgst serve flipped bytes of the right
// length, while Docker-Content-Digest still names dgst.
func (h *Hub) CorruptBlob(dgst digest.Digest, on bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if on {
		h.corrupt[dgst] = true
	} else {
		delete(h.corrupt, dgst)
	}
}

// ResetLimits refills every rate-limit bucket. Counters are kept.
func (h *Hub) ResetLimits() {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.buckets = map[string]*bucket{}
}

// ResetCounts zeroes every counter, including per-digest, per-reference and
// per-account counts and the record of basic-auth users.
func (h *Hub) ResetCounts() {
	for _, c := range []*atomic.Int64{
		&h.counts.requests, &h.counts.manifestGET, &h.counts.manifestHEAD,
		&h.counts.blobGET, &h.counts.blobHEAD, &h.counts.tokenRequests,
		&h.counts.throttled, &h.counts.unauthorized, &h.counts.outage,
	} {
		c.Store(0)
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	h.pulls = map[string]int64{}
	h.blobGETs = map[digest.Digest]int64{}
	h.manifestGETs = map[string]int64{}
	h.sawBasic = map[string]bool{}
}

// Counts returns a snapshot of the counters.
func (h *Hub) Counts() Counts {
	return Counts{
		Requests:      h.counts.requests.Load(),
		ManifestGET:   h.counts.manifestGET.Load(),
		ManifestHEAD:  h.counts.manifestHEAD.Load(),
		BlobGET:       h.counts.blobGET.Load(),
		BlobHEAD:      h.counts.blobHEAD.Load(),
		TokenRequests: h.counts.tokenRequests.Load(),
		Throttled:     h.counts.throttled.Load(),
		Unauthorized:  h.counts.unauthorized.Load(),
		Outage:        h.counts.outage.Load(),
	}
}

// BlobGETs returns how many authorized GETs asked for blob dgst.
func (h *Hub) BlobGETs(dgst digest.Digest) int64 {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.blobGETs[dgst]
}

// ManifestGETs returns how many admitted manifest GETs asked for repo at
// reference ref (a tag or a digest string).
func (h *Hub) ManifestGETs(repo, ref string) int64 {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.manifestGETs[repo+"|"+ref]
}

// Pulls returns the pulls counted against source: an account name, or the
// client IP ("127.0.0.1") for anonymous clients. It is the value of the
// docker-ratelimit-source header, and it is not reset by ResetLimits.
func (h *Hub) Pulls(source string) int64 {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.pulls[source]
}

// SawBasicAuth reports whether a request carrying basic-auth credentials
// for user (right or wrong password) reached the hub.
func (h *Hub) SawBasicAuth(user string) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.sawBasic[user]
}

func randomHex(n int) string {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		panic(err) // crypto/rand never fails on supported platforms
	}
	return hex.EncodeToString(b)
}

// writeError answers with a distribution-style error envelope.
func writeError(w http.ResponseWriter, r *http.Request, status int, code, msg string) {
	body := `{"errors":[{"code":"` + code + `","message":` + jsonString(msg) + `,"detail":null}]}` + "\n"
	w.Header().Set("Content-Type", "application/json")
	w.Header().Del("Content-Length")
	w.WriteHeader(status)
	if r.Method != http.MethodHead {
		_, _ = w.Write([]byte(body))
	}
}
