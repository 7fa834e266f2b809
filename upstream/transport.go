package upstream

import (
	"container/list"
	"context"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Observer sees every upstream response (pings, tokens, manifests, blobs),
// before anything reads its body. *budget.Budget implements it.
type Observer interface {
	Observe(ctx context.Context, upstream, account string, resp *http.Response)
}

// Gate is implemented by an Observer that also decides counted requests.
// The client calls Take once for every manifest GET, just before sending it;
// an error refuses the request, which is then not sent. Take both decides
// and counts, atomically (the response's ratelimit headers, which count the
// request themselves, then overwrite the estimate). HEADs and blob GETs are
// not counted, as on Docker Hub.
type Gate interface {
	Take(ctx context.Context, upstream, account string) error
}

// Request kinds in metrics.
const (
	kindManifest = "manifest"
	kindBlob     = "blob"
	kindToken    = "token"
	kindPing     = "ping"
)

type kindKey struct{}

// observing is the base of every upstream round trip: it counts requests
// and shows each response to the Observer.
type observing struct {
	inner    http.RoundTripper
	upstream string
	account  string
	observer Observer
	requests *prometheus.CounterVec
	ua       string
}

func (t *observing) RoundTrip(req *http.Request) (*http.Response, error) {
	if req.Header.Get("User-Agent") == "" || strings.HasPrefix(req.Header.Get("User-Agent"), "go-containerregistry") {
		req = req.Clone(req.Context())
		req.Header.Set("User-Agent", t.ua)
	}
	kind := requestKind(req)
	resp, err := t.inner.RoundTrip(req)
	status := "error"
	if err == nil {
		status = strconv.Itoa(resp.StatusCode)
	}
	t.requests.WithLabelValues(t.upstream, req.Method, kind, status).Inc()
	if err == nil && t.observer != nil {
		t.observer.Observe(req.Context(), t.upstream, t.account, resp)
	}
	return resp, err
}

// requestKind classifies a request for metrics: the registry API routes by
// path, token requests by their query, and redirected requests (blob
// storage) by the kind the client put in the context.
func requestKind(req *http.Request) string {
	p := req.URL.Path
	q := req.URL.Query()
	switch {
	case p == "/v2/" || p == "/v2":
		return kindPing
	case q.Has("scope") || q.Has("service") || req.Method == http.MethodPost:
		return kindToken
	case strings.Contains(p, "/manifests/"):
		return kindManifest
	case strings.Contains(p, "/blobs/"):
		return kindBlob
	}
	if k, ok := req.Context().Value(kindKey{}).(string); ok {
		return k
	}
	return kindToken
}

// cloning hands the inner transport a copy of each request, so headers it
// sets (Authorization) never land on the request that http.Client copies
// headers from when it follows a redirect.
type cloning struct{ inner http.RoundTripper }

func (t cloning) RoundTrip(req *http.Request) (*http.Response, error) {
	return t.inner.RoundTrip(req.Clone(req.Context()))
}

// stripAuthOnRedirect is an http.Client CheckRedirect that never sends an
// Authorization header to another host:port than the first request's.
// (net/http alone keeps it for the same hostname on another port and for
// subdomains.)
func stripAuthOnRedirect(req *http.Request, via []*http.Request) error {
	if len(via) >= 10 {
		return http.ErrUseLastResponse
	}
	if req.URL.Host != via[0].URL.Host {
		req.Header.Del("Authorization")
	}
	return nil
}

// lru is a small LRU cache with per-entry expiry.
type lru[K comparable, V any] struct {
	mu  sync.Mutex
	max int
	ll  *list.List
	m   map[K]*list.Element
	now func() time.Time
}

type lruEntry[K comparable, V any] struct {
	k       K
	v       V
	expires time.Time
}

func newLRU[K comparable, V any](max int) *lru[K, V] {
	return &lru[K, V]{max: max, ll: list.New(), m: make(map[K]*list.Element), now: time.Now}
}

func (c *lru[K, V]) get(k K) (V, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	var zero V
	el, ok := c.m[k]
	if !ok {
		return zero, false
	}
	e := el.Value.(*lruEntry[K, V])
	if !c.now().Before(e.expires) {
		c.ll.Remove(el)
		delete(c.m, k)
		return zero, false
	}
	c.ll.MoveToFront(el)
	return e.v, true
}

func (c *lru[K, V]) put(k K, v V, ttl time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	e := &lruEntry[K, V]{k: k, v: v, expires: c.now().Add(ttl)}
	if el, ok := c.m[k]; ok {
		el.Value = e
		c.ll.MoveToFront(el)
		return
	}
	c.m[k] = c.ll.PushFront(e)
	for c.ll.Len() > c.max {
		last := c.ll.Back()
		c.ll.Remove(last)
		delete(c.m, last.Value.(*lruEntry[K, V]).k)
	}
}

func (c *lru[K, V]) remove(k K) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if el, ok := c.m[k]; ok {
		c.ll.Remove(el)
		delete(c.m, k)
	}
}
