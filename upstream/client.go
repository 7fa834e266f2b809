// Package upstream is the cache tier's client to real registries: ping,
// bearer and basic token flow, manifest HEAD and GET, and blob GET with
// Range. Every upstream response is shown to an Observer (the rate-limit
// budget) and counted in shoal_upstream_requests_total.
//
// Counting: the client calls Gate.Take (when the Observer implements it)
// once for every manifest GET, just before sending it, and does not send a
// GET that Take refuses. Whether a pull is cold (and may spend the reserve)
// travels in the context (budget.WithCold).
package upstream

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"mime"
	"net"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote/transport"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/shoal-oci/shoal/oci"
	"golang.org/x/sync/singleflight"
)

// Descriptor describes a manifest as the upstream serves it.
type Descriptor struct {
	Digest    digest.Digest
	Size      int64
	MediaType string
}

// Anonymous is the account label for requests without credentials.
const Anonymous = "anonymous"

// manifestAccept lists every manifest media type the client accepts.
var manifestAccept = strings.Join([]string{
	ocispec.MediaTypeImageIndex, ocispec.MediaTypeImageManifest,
	oci.MediaTypeDockerManifestList, oci.MediaTypeDockerManifest,
}, ", ")

// Client talks to upstream registries. It is safe for concurrent use.
type Client struct {
	cfg       Config
	keychain  authn.Keychain
	observer  Observer
	reg       prometheus.Registerer
	log       *slog.Logger
	base      http.RoundTripper
	dial      time.Duration
	header    time.Duration
	userAgent string
	requests  *prometheus.CounterVec

	pings      *lru[string, *transport.Challenge]
	transports *lru[transportKey, http.RoundTripper]
	flight     singleflight.Group
}

type transportKey struct{ registry, repo, account string }

// Option configures a Client.
type Option func(*Client)

// WithKeychain sets where credentials come from (default: anonymous).
func WithKeychain(k authn.Keychain) Option { return func(c *Client) { c.keychain = k } }

// WithObserver shows every upstream response to o; if o also implements
// Gate, every manifest GET must pass it first.
func WithObserver(o Observer) Option { return func(c *Client) { c.observer = o } }

// WithRegisterer registers the client's metrics on r.
func WithRegisterer(r prometheus.Registerer) Option { return func(c *Client) { c.reg = r } }

// WithLogger sets the logger (default: discard).
func WithLogger(l *slog.Logger) Option { return func(c *Client) { c.log = l } }

// WithBaseTransport replaces the HTTP transport under the auth and metrics
// layers. Its timeouts are then the caller's; WithTimeouts no longer applies.
func WithBaseTransport(rt http.RoundTripper) Option { return func(c *Client) { c.base = rt } }

// WithTimeouts sets the dial timeout (default 5s) and the time to wait for
// response headers (default 15s). Bodies have no timeout: blobs are long;
// cancel the context instead.
func WithTimeouts(dial, responseHeader time.Duration) Option {
	return func(c *Client) {
		if dial > 0 {
			c.dial = dial
		}
		if responseHeader > 0 {
			c.header = responseHeader
		}
	}
}

// WithUserAgent sets the User-Agent of upstream requests.
func WithUserAgent(ua string) Option { return func(c *Client) { c.userAgent = ua } }

// New returns a Client for cfg.
func New(cfg Config, opts ...Option) (*Client, error) {
	c := &Client{
		cfg:        cfg,
		keychain:   anonymousKeychain{},
		log:        slog.New(slog.NewTextHandler(io.Discard, nil)),
		dial:       5 * time.Second,
		header:     15 * time.Second,
		userAgent:  "shoal",
		pings:      newLRU[string, *transport.Challenge](64),
		transports: newLRU[transportKey, http.RoundTripper](512),
	}
	for _, o := range opts {
		o(c)
	}
	for host := range cfg.Registries {
		if _, err := cfg.resolve(host); err != nil {
			return nil, err
		}
	}
	if c.base == nil {
		c.base = &http.Transport{
			Proxy:                 http.ProxyFromEnvironment,
			DialContext:           (&net.Dialer{Timeout: c.dial, KeepAlive: 30 * time.Second}).DialContext,
			ForceAttemptHTTP2:     true,
			MaxIdleConns:          100,
			MaxIdleConnsPerHost:   16,
			IdleConnTimeout:       90 * time.Second,
			TLSHandshakeTimeout:   c.dial + 5*time.Second,
			ResponseHeaderTimeout: c.header,
			ExpectContinueTimeout: time.Second,
		}
	}
	c.requests = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "shoal_upstream_requests_total",
		Help: "Requests sent to upstream registries, by kind (manifest, blob, token, ping) and status code (or \"error\").",
	}, []string{"upstream", "method", "kind", "status"})
	if c.reg != nil {
		if err := c.reg.Register(c.requests); err != nil {
			return nil, fmt.Errorf("upstream: register metrics: %w", err)
		}
	}
	// A 429 on a counted pull is the series operators alert on. It starts
	// at zero for every upstream, so that increase() counts the first one
	// (a counter born at 1 shows no increase) and the panel has a series
	// before anything went wrong.
	for host := range cfg.Registries {
		if r, err := cfg.resolve(host); err == nil {
			c.requests.WithLabelValues(r.host, http.MethodGet, "manifest", "429")
		}
	}
	return c, nil
}

type anonymousKeychain struct{}

func (anonymousKeychain) Resolve(authn.Resource) (authn.Authenticator, error) {
	return authn.Anonymous, nil
}

// credentials returns the authenticator and the account label for a
// registry host. The label is the keychain's Account(host) when it has one,
// else the username, else "anonymous"; never a secret.
func (c *Client) credentials(ctx context.Context, host string) (authn.Authenticator, string, error) {
	res, err := name.NewRegistry(host, name.WeakValidation)
	if err != nil {
		return nil, "", fmt.Errorf("upstream %s: %w", host, err)
	}
	auth, err := c.keychain.Resolve(res)
	if err != nil {
		return nil, "", fmt.Errorf("upstream %s: resolve credentials: %w", host, err)
	}
	if a, ok := c.keychain.(interface{ Account(string) string }); ok {
		if acct := a.Account(host); acct != "" {
			return auth, acct, nil
		}
		return auth, Anonymous, nil
	}
	if auth == authn.Anonymous {
		return auth, Anonymous, nil
	}
	ac, err := authn.Authorization(ctx, auth)
	if err != nil {
		return nil, "", fmt.Errorf("upstream %s: read credentials: %w", host, err)
	}
	if ac.Username == "" {
		return auth, Anonymous, nil
	}
	return auth, ac.Username, nil
}

// Account returns the account label used for registry (for budgets and
// metrics): a username or "anonymous", never a secret.
func (c *Client) Account(registry string) string {
	r, err := c.cfg.resolve(registry)
	if err != nil {
		return Anonymous
	}
	_, acct, err := c.credentials(context.Background(), r.host)
	if err != nil {
		return Anonymous
	}
	return acct
}

// transport returns the authenticated RoundTripper for (registry, repo,
// account), pinging the registry (once per registry) and fetching a pull
// token (once per repository until it expires).
func (c *Client) transport(ctx context.Context, r resolved, repo string, auth authn.Authenticator, account string) (http.RoundTripper, error) {
	key := transportKey{r.host, repo, account}
	if rt, ok := c.transports.get(key); ok {
		return rt, nil
	}
	v, err, _ := c.flight.Do(fmt.Sprintf("%s\x00%s\x00%s", r.host, repo, account), func() (any, error) {
		if rt, ok := c.transports.get(key); ok {
			return rt, nil
		}
		base := &observing{inner: c.base, upstream: r.host, account: account, observer: c.observer, requests: c.requests, ua: c.userAgent}
		var nopts []name.Option
		if r.insecure {
			nopts = append(nopts, name.Insecure)
		}
		reg, err := name.NewRegistry(r.addr, nopts...)
		if err != nil {
			return nil, fmt.Errorf("upstream %s: %w", r.host, err)
		}
		ch, ok := c.pings.get(r.host)
		if !ok {
			if ch, err = transport.Ping(ctx, reg, base); err != nil {
				return nil, transportError(r.host, "ping", err)
			}
			c.pings.put(r.host, ch, time.Hour)
		}
		var rt http.RoundTripper = base
		ttl := time.Hour
		switch strings.ToLower(ch.Scheme) {
		case "":
			// The registry needs no authentication.
		case "bearer":
			scope := "repository:" + repo + ":pull"
			tok, err := transport.Exchange(ctx, reg, auth, base, []string{scope}, ch)
			if err != nil {
				return nil, transportError(r.host, "token for "+repo, err)
			}
			if rt, err = transport.FromToken(reg, auth, base, ch, tok); err != nil {
				return nil, transportError(r.host, "token for "+repo, err)
			}
			ttl = tokenTTL(tok.ExpiresIn)
			c.log.DebugContext(ctx, "upstream token", "upstream", r.host, "repo", repo, "account", account, "ttl", ttl)
		default:
			if rt, err = transport.FromToken(reg, auth, base, ch, &transport.Token{}); err != nil {
				return nil, transportError(r.host, "auth", err)
			}
		}
		rt = cloning{rt}
		c.transports.put(key, rt, ttl)
		return rt, nil
	})
	if err != nil {
		return nil, err
	}
	return v.(http.RoundTripper), nil
}

// tokenTTL keeps a token until shortly before it expires (60s when the
// token server does not say, as the token spec defines).
func tokenTTL(expiresIn int) time.Duration {
	d := time.Duration(expiresIn) * time.Second
	if d <= 0 {
		d = 60 * time.Second
	}
	return max(d-d/10, time.Second)
}

// do sends one request to the registry API and returns a successful
// response or an error; a counted request must pass the Gate first.
func (c *Client) do(ctx context.Context, registry, repo, method, path, kind, op string, hdr http.Header, count bool, ok ...int) (*http.Response, error) {
	r, err := c.cfg.resolve(registry)
	if err != nil {
		return nil, err
	}
	auth, account, err := c.credentials(ctx, r.host)
	if err != nil {
		return nil, err
	}
	rt, err := c.transport(ctx, r, repo, auth, account)
	if err != nil {
		return nil, err
	}
	ctx = context.WithValue(ctx, kindKey{}, kind)
	u := r.scheme + "://" + r.addr + "/v2/" + repo + path
	req, err := http.NewRequestWithContext(ctx, method, u, nil)
	if err != nil {
		return nil, fmt.Errorf("upstream %s: %s: %w", r.host, op, err)
	}
	for k, v := range hdr {
		req.Header[k] = v
	}
	if g, ok := c.observer.(Gate); ok && count {
		if err := g.Take(ctx, r.host, account); err != nil {
			return nil, fmt.Errorf("upstream %s: %s: %w", r.host, op, err)
		}
	}
	hc := &http.Client{Transport: rt, CheckRedirect: stripAuthOnRedirect}
	resp, err := hc.Do(req)
	if err != nil {
		return nil, fmt.Errorf("upstream %s: %s: %w", r.host, op, err)
	}
	for _, s := range ok {
		if resp.StatusCode == s {
			return resp, nil
		}
	}
	if resp.StatusCode == http.StatusUnauthorized || resp.StatusCode == http.StatusForbidden {
		c.transports.remove(transportKey{r.host, repo, account})
	}
	return nil, responseError(r.host, op, resp)
}

func refOp(method, what, repo, ref string) string {
	sep := ":"
	if strings.Contains(ref, ":") {
		sep = "@"
	}
	return method + " " + what + " " + repo + sep + ref
}

// HeadManifest asks the upstream for a manifest's descriptor. HEAD requests
// are not counted by Docker Hub, so this is how tags are revalidated.
func (c *Client) HeadManifest(ctx context.Context, registry, repo, ref string) (Descriptor, error) {
	repo = NormalizeRepo(registry, repo)
	op := refOp("HEAD", "manifest", repo, ref)
	resp, err := c.do(ctx, registry, repo, http.MethodHead, "/manifests/"+ref, kindManifest, op,
		http.Header{"Accept": {manifestAccept}}, false, http.StatusOK)
	if err != nil {
		return Descriptor{}, err
	}
	defer resp.Body.Close()
	d := Descriptor{Size: resp.ContentLength, MediaType: mediaType(resp.Header.Get("Content-Type"))}
	if dg, err := digest.Parse(resp.Header.Get("Docker-Content-Digest")); err == nil {
		d.Digest = dg
	} else if dg, err := digest.Parse(ref); err == nil {
		d.Digest = dg
	} else {
		return Descriptor{}, fmt.Errorf("upstream %s: %s: no Docker-Content-Digest in the answer", registry, op)
	}
	if d.Size < 0 {
		d.Size = 0
	}
	return d, nil
}

// GetManifest fetches a manifest (a counted request). It accepts OCI and
// Docker manifests and indexes, reads at most oci.MaxManifestSize bytes, and
// verifies the content against ref when ref is a digest, else against the
// Docker-Content-Digest header when the upstream sends one.
func (c *Client) GetManifest(ctx context.Context, registry, repo, ref string) ([]byte, Descriptor, error) {
	repo = NormalizeRepo(registry, repo)
	op := refOp("GET", "manifest", repo, ref)
	resp, err := c.do(ctx, registry, repo, http.MethodGet, "/manifests/"+ref, kindManifest, op,
		http.Header{"Accept": {manifestAccept}}, true, http.StatusOK)
	if err != nil {
		return nil, Descriptor{}, err
	}
	defer resp.Body.Close()
	if resp.ContentLength > oci.MaxManifestSize {
		return nil, Descriptor{}, fmt.Errorf("upstream %s: %s: manifest of %d bytes is larger than %d", registry, op, resp.ContentLength, oci.MaxManifestSize)
	}
	b, err := io.ReadAll(io.LimitReader(resp.Body, oci.MaxManifestSize+1))
	if err != nil {
		return nil, Descriptor{}, fmt.Errorf("upstream %s: %s: read: %w", registry, op, err)
	}
	if len(b) > oci.MaxManifestSize {
		return nil, Descriptor{}, fmt.Errorf("upstream %s: %s: manifest larger than %d bytes", registry, op, oci.MaxManifestSize)
	}
	want, err := digest.Parse(ref)
	if err != nil {
		want, _ = digest.Parse(resp.Header.Get("Docker-Content-Digest"))
	}
	alg := digest.Canonical
	if want != "" && want.Algorithm().Available() {
		alg = want.Algorithm()
	}
	got := alg.FromBytes(b)
	if want != "" && got != want {
		return nil, Descriptor{}, fmt.Errorf("upstream %s: %s: %w: got %s, want %s", registry, op, oci.ErrDigestMismatch, got, want)
	}
	mt := mediaType(resp.Header.Get("Content-Type"))
	if !oci.IsManifestMediaType(mt) {
		if s := oci.SniffManifestMediaType(b); s != "" {
			mt = s
		}
	}
	return b, Descriptor{Digest: got, Size: int64(len(b)), MediaType: mt}, nil
}

// GetBlob opens a blob from offset (with a Range request when offset > 0),
// following redirects to blob storage without sending Authorization to
// another host. It returns the body from offset on and the blob's total
// size. The caller verifies the content against dgst; the body has no
// timeout, only the context.
func (c *Client) GetBlob(ctx context.Context, registry, repo string, dgst digest.Digest, offset int64) (io.ReadCloser, int64, error) {
	repo = NormalizeRepo(registry, repo)
	op := refOp("GET", "blob", repo, dgst.String())
	if err := dgst.Validate(); err != nil {
		return nil, 0, fmt.Errorf("upstream %s: %s: %w", registry, op, err)
	}
	if offset < 0 {
		return nil, 0, fmt.Errorf("upstream %s: %s: negative offset %d", registry, op, offset)
	}
	hdr := http.Header{}
	if offset > 0 {
		hdr.Set("Range", fmt.Sprintf("bytes=%d-", offset))
	}
	resp, err := c.do(ctx, registry, repo, http.MethodGet, "/blobs/"+dgst.String(), kindBlob, op, hdr, false,
		http.StatusOK, http.StatusPartialContent)
	if err != nil {
		return nil, 0, err
	}
	if resp.StatusCode == http.StatusOK {
		total := resp.ContentLength
		if offset > 0 {
			// The upstream ignored Range: skip to offset ourselves.
			if _, err := io.CopyN(io.Discard, resp.Body, offset); err != nil {
				resp.Body.Close()
				return nil, 0, fmt.Errorf("upstream %s: %s: skip to %d: %w", registry, op, offset, err)
			}
		}
		return resp.Body, total, nil
	}
	start, total, err := parseContentRange(resp.Header.Get("Content-Range"))
	if err != nil || start != offset {
		resp.Body.Close()
		return nil, 0, fmt.Errorf("upstream %s: %s: bad Content-Range %q for offset %d", registry, op, resp.Header.Get("Content-Range"), offset)
	}
	return resp.Body, total, nil
}

// parseContentRange parses "bytes start-end/total"; total is -1 for "*".
func parseContentRange(v string) (start, total int64, err error) {
	rest, ok := strings.CutPrefix(strings.TrimSpace(v), "bytes ")
	if !ok {
		return 0, 0, errors.New("not a byte range")
	}
	rng, tot, ok := strings.Cut(rest, "/")
	if !ok {
		return 0, 0, errors.New("no total")
	}
	s, _, ok := strings.Cut(rng, "-")
	if !ok {
		return 0, 0, errors.New("no range")
	}
	if start, err = strconv.ParseInt(s, 10, 64); err != nil {
		return 0, 0, err
	}
	if tot == "*" {
		return start, -1, nil
	}
	total, err = strconv.ParseInt(tot, 10, 64)
	return start, total, err
}

func mediaType(ct string) string {
	if mt, _, err := mime.ParseMediaType(ct); err == nil {
		return mt
	}
	return ct
}
