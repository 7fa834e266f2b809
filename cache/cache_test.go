package cache_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/shoal-oci/shoal/cache"
	"github.com/shoal-oci/shoal/cache/flight"
	"github.com/shoal-oci/shoal/cache/herd"
	"github.com/shoal-oci/shoal/oci"
	"github.com/shoal-oci/shoal/test/hub"
	"github.com/shoal-oci/shoal/upstream"
	"github.com/shoal-oci/shoal/upstream/budget"
)

type fixture struct {
	hub   *hub.Hub
	srv   *httptest.Server
	c     *cache.Cache
	clock *clock
	ns    string
	// handlers counts the cache's requests in progress: a client has a
	// whole body before the handler's deferred work (a blob's last recency
	// touch) is done.
	handlers *sync.WaitGroup
}

// settle waits until every request to the cache has returned from its
// handler, so that what it recorded was recorded at the clock's time now.
func (f *fixture) settle() { f.handlers.Wait() }

// countingServer serves h until the test ends, counting its requests in
// progress in the returned WaitGroup.
func countingServer(t *testing.T, h http.Handler) (*httptest.Server, *sync.WaitGroup) {
	handlers := &sync.WaitGroup{}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		handlers.Add(1)
		defer handlers.Done()
		h.ServeHTTP(w, r)
	}))
	t.Cleanup(srv.Close)
	return srv, handlers
}

type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.t }
func (c *clock) add(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

func newFixture(t *testing.T, hubOpts []hub.Option, mutate func(*cache.Config)) *fixture {
	t.Helper()
	return newFixtureBudget(t, hubOpts, budget.New(budget.NewMemoryState(), budget.WithReserve(2)), mutate)
}

// newFixtureBudget is newFixture with the budget that both the cache and its
// upstream client use.
func newFixtureBudget(t *testing.T, hubOpts []hub.Option, bud *budget.Budget, mutate func(*cache.Config)) *fixture {
	t.Helper()
	h := hub.Start(t, hubOpts...)
	up, err := upstream.New(upstream.Config{Registries: map[string]upstream.Registry{
		h.Host(): {Host: h.Host(), Endpoint: h.URL(), Insecure: true},
	}}, upstream.WithObserver(bud))
	if err != nil {
		t.Fatal(err)
	}
	fl, err := flight.NewLocal(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	storageDir := t.TempDir()
	// Commits finish after the client's last byte: wait for them before the
	// storage directory is removed (cleanups run last-in, first-out).
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_ = fl.Drain(ctx)
	})
	drv, err := cache.NewDriver(context.Background(), "filesystem", map[string]any{"rootdirectory": storageDir})
	if err != nil {
		t.Fatal(err)
	}
	clk := &clock{t: time.Now()}
	cfg := cache.Config{Driver: drv, Upstream: up, Flight: fl, Budget: bud, Registries: []string{h.Host()},
		TagFreshness: time.Minute, UpstreamTimeout: 2 * time.Second, Now: clk.now}
	if mutate != nil {
		mutate(&cfg)
	}
	c, err := cache.New(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	srv, handlers := countingServer(t, c)
	return &fixture{hub: h, srv: srv, c: c, clock: clk, ns: h.Host(), handlers: handlers}
}

func (f *fixture) get(t *testing.T, method, path string, hdr ...string) (*http.Response, []byte) {
	t.Helper()
	sep := "?"
	if strings.Contains(path, "?") {
		sep = "&"
	}
	req, _ := http.NewRequest(method, f.srv.URL+path+sep+"ns="+f.ns, nil)
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp, b
}

func errCode(b []byte) string {
	var env struct{ Errors []struct{ Code string } }
	if json.Unmarshal(b, &env) != nil || len(env.Errors) == 0 {
		return ""
	}
	return env.Errors[0].Code
}

func TestPullThrough(t *testing.T) {
	f := newFixture(t, nil, nil)
	img := hub.Image(t, 200_000, 2)
	md := f.hub.Push(t, "library/app", "v1", img)
	layers, _ := img.Layers()
	ld, _ := layers[0].Digest()
	lb, _ := layers[0].Compressed()
	want, _ := io.ReadAll(lb)

	// A HEAD of an uncached tag costs an upstream HEAD, never a GET.
	resp, _ := f.get(t, "HEAD", "/v2/library/app/manifests/v1")
	if resp.StatusCode != 200 || resp.Header.Get("Docker-Content-Digest") != md.String() {
		t.Fatalf("HEAD tag: %d %s", resp.StatusCode, resp.Header.Get("Docker-Content-Digest"))
	}
	if c := f.hub.Counts(); c.ManifestGET != 0 || c.ManifestHEAD != 1 {
		t.Fatalf("after HEAD: %+v", c)
	}
	resp, body := f.get(t, "GET", "/v2/library/app/manifests/v1")
	if resp.StatusCode != 200 || digest.FromBytes(body) != md {
		t.Fatalf("GET tag: %d", resp.StatusCode)
	}
	resp, body = f.get(t, "GET", "/v2/library/app/blobs/"+ld.String())
	if resp.StatusCode != 200 || !bytes.Equal(body, want) {
		t.Fatalf("GET blob: %d %d bytes", resp.StatusCode, len(body))
	}
	resp, body = f.get(t, "GET", "/v2/library/app/blobs/"+ld.String(), "Range", "bytes=10-19")
	if resp.StatusCode != 206 || !bytes.Equal(body, want[10:20]) {
		t.Fatalf("range on cached blob: %d", resp.StatusCode)
	}
	before := f.hub.Counts()
	for i := 0; i < 20; i++ {
		resp, _ = f.get(t, "GET", "/v2/library/app/manifests/v1")
		if resp.StatusCode != 200 {
			t.Fatalf("cached tag: %d", resp.StatusCode)
		}
	}
	if after := f.hub.Counts(); after.ManifestGET != before.ManifestGET || after.ManifestHEAD != before.ManifestHEAD {
		t.Fatalf("fresh tag went upstream: %+v -> %+v", before, after)
	}
	// Past the freshness window: one free HEAD, no GET.
	f.clock.add(2 * time.Minute)
	resp, _ = f.get(t, "GET", "/v2/library/app/manifests/v1")
	if after := f.hub.Counts(); resp.StatusCode != 200 || after.ManifestGET != before.ManifestGET || after.ManifestHEAD != before.ManifestHEAD+1 {
		t.Fatalf("revalidation: %d %+v -> %+v", resp.StatusCode, before, after)
	}
	// Upstream re-tag: the next pull past the window gets the new digest.
	img2 := hub.Image(t, 1000, 1)
	md2 := f.hub.Retag(t, "library/app", "v1", img2)
	f.clock.add(2 * time.Minute)
	resp, body = f.get(t, "GET", "/v2/library/app/manifests/v1")
	if resp.StatusCode != 200 || digest.FromBytes(body) != md2 {
		t.Fatalf("after retag: %d got %s want %s", resp.StatusCode, digest.FromBytes(body), md2)
	}
	// Outage: the cached tag is served stale with a Warning.
	f.hub.SetOutage(true)
	f.clock.add(2 * time.Minute)
	resp, body = f.get(t, "GET", "/v2/library/app/manifests/v1")
	if resp.StatusCode != 200 || digest.FromBytes(body) != md2 || !strings.Contains(resp.Header.Get("Warning"), "stale") {
		t.Fatalf("outage: %d warning %q", resp.StatusCode, resp.Header.Get("Warning"))
	}
	resp, body = f.get(t, "GET", "/v2/library/other/manifests/v1")
	if resp.StatusCode != 503 || errCode(body) != "UNAVAILABLE" {
		t.Fatalf("uncached during outage: %d %s", resp.StatusCode, body)
	}
}

func TestConcurrentMissesFetchOnce(t *testing.T) {
	f := newFixture(t, nil, nil)
	img := hub.Image(t, 2<<20, 1)
	f.hub.Push(t, "library/big", "v1", img)
	layers, _ := img.Layers()
	ld, _ := layers[0].Digest()
	f.hub.SetBandwidth(8 << 20)
	var wg sync.WaitGroup
	bodies := make([][]byte, 16)
	for i := range bodies {
		wg.Add(1)
		go func() {
			defer wg.Done()
			resp, b := f.get(t, "GET", "/v2/library/big/blobs/"+ld.String())
			if resp.StatusCode != 200 {
				t.Errorf("status %d", resp.StatusCode)
			}
			bodies[i] = b
		}()
	}
	wg.Wait()
	if n := f.hub.BlobGETs(digest.Digest(ld.String())); n != 1 {
		t.Fatalf("upstream blob GETs = %d, want 1", n)
	}
	for i := range bodies {
		if digest.FromBytes(bodies[i]).String() != ld.String() {
			t.Fatalf("client %d got bad bytes (%d)", i, len(bodies[i]))
		}
	}
}

func TestCorruptUpstreamBlobIsNeverStored(t *testing.T) {
	f := newFixture(t, nil, nil)
	img := hub.Image(t, 100_000, 1)
	f.hub.Push(t, "library/bad", "v1", img)
	layers, _ := img.Layers()
	ld, _ := layers[0].Digest()
	f.hub.CorruptBlob(digest.Digest(ld.String()), true)
	resp, err := http.Get(f.srv.URL + "/v2/library/bad/blobs/" + ld.String() + "?ns=" + f.ns)
	if err == nil {
		b, rerr := io.ReadAll(resp.Body)
		resp.Body.Close()
		if rerr == nil && resp.StatusCode == 200 && digest.FromBytes(b).String() == ld.String() {
			t.Fatal("corrupt blob delivered as good")
		}
		if rerr == nil && resp.StatusCode == 200 {
			t.Fatalf("corrupt bytes delivered with a 200 and a complete body")
		}
	}
	f.hub.CorruptBlob(digest.Digest(ld.String()), false)
	gets := f.hub.BlobGETs(digest.Digest(ld.String()))
	resp2, body := f.get(t, "GET", "/v2/library/bad/blobs/"+ld.String())
	if resp2.StatusCode != 200 || digest.FromBytes(body).String() != ld.String() {
		t.Fatalf("after repair: %d", resp2.StatusCode)
	}
	if f.hub.BlobGETs(digest.Digest(ld.String())) != gets+1 {
		t.Fatal("the corrupt copy was stored: no new upstream fetch after repair")
	}
}

func TestBudgetExhausted(t *testing.T) {
	f := newFixture(t, []hub.Option{hub.WithAnonymousLimit(3)}, nil)
	cached := f.hub.Push(t, "library/cached", "v1", hub.Image(t, 1000, 1))
	f.hub.Push(t, "library/cold", "v1", hub.Image(t, 1000, 1))
	if resp, _ := f.get(t, "GET", "/v2/library/cached/manifests/v1"); resp.StatusCode != 200 {
		t.Fatalf("warm-up: %d", resp.StatusCode)
	}
	// Spend the rest of the budget on two other images.
	for _, repo := range []string{"library/a", "library/b"} {
		f.hub.Push(t, repo, "v1", hub.Image(t, 1000, 1))
		if resp, _ := f.get(t, "GET", "/v2/"+repo+"/manifests/v1"); resp.StatusCode != 200 {
			t.Fatalf("spending %s: %d", repo, resp.StatusCode)
		}
	}
	if n := f.hub.Counts().ManifestGET; n != 3 {
		t.Fatalf("counted upstream GETs = %d, want 3", n)
	}
	f.clock.add(2 * time.Minute)
	f.hub.Retag(t, "library/cached", "v1", hub.Image(t, 1000, 1)) // a GET would be needed now
	resp, body := f.get(t, "GET", "/v2/library/cached/manifests/v1")
	if resp.StatusCode != 200 || digest.FromBytes(body) != cached || !strings.Contains(resp.Header.Get("Warning"), "stale") {
		t.Fatalf("exhausted, cached: %d %q", resp.StatusCode, resp.Header.Get("Warning"))
	}
	resp, body = f.get(t, "GET", "/v2/library/cold/manifests/v1")
	if resp.StatusCode != 429 || errCode(body) != "TOOMANYREQUESTS" || !strings.Contains(string(body), "library/cold:v1") {
		t.Fatalf("exhausted, uncached: %d %s (the message must name the tag)", resp.StatusCode, body)
	}
	if n := f.hub.Counts().ManifestGET; n != 3 {
		t.Fatalf("the cache spent past an exhausted budget: %d counted GETs", n)
	}
}

func TestBadInput(t *testing.T) {
	f := newFixture(t, nil, nil)
	d := f.hub.Push(t, "library/x", "v1", hub.Image(t, 1000, 1))
	_ = d
	for _, tc := range []struct {
		method, path string
		status       int
		code         string
	}{
		{"GET", "/v2/library/x/manifests/v1?ns=unknown.example", 404, "NAME_UNKNOWN"},
		{"GET", "/v2/library/x/blobs/sha256:abc", 400, "DIGEST_INVALID"},
		{"GET", "/v2/Library/x/manifests/v1", 400, "NAME_INVALID"},
		{"DELETE", "/v2/library/x/manifests/v1", 405, "UNSUPPORTED"},
		{"GET", "/v2/library/x/blobs/" + digest.FromString("nope").String(), 404, "BLOB_UNKNOWN"},
		{"GET", "/v2/library/x/manifests/nope", 404, "MANIFEST_UNKNOWN"},
	} {
		req, _ := http.NewRequest(tc.method, f.srv.URL+tc.path, nil)
		if !strings.Contains(tc.path, "ns=") {
			req.URL.RawQuery = "ns=" + f.ns
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != tc.status || errCode(b) != tc.code {
			t.Errorf("%s %s: %d %s, want %d %s", tc.method, tc.path, resp.StatusCode, b, tc.status, tc.code)
		}
	}
	img := hub.Image(t, 1000, 1)
	f.hub.Push(t, "library/r", "v1", img)
	layers, _ := img.Layers()
	ld, _ := layers[0].Digest()
	f.get(t, "GET", "/v2/library/r/blobs/"+ld.String())
	resp, body := f.get(t, "GET", "/v2/library/r/blobs/"+ld.String(), "Range", "bytes=999999-")
	if resp.StatusCode != 416 || errCode(body) != "RANGE_INVALID" {
		t.Fatalf("range past end: %d %s", resp.StatusCode, body)
	}
	_ = fmt.Sprint
}

// containerd resolves a tag with HEAD and then GETs the digest it got: once
// the budget is spent, a moved tag must resolve to the content still held.
func TestHeadOfMovedTagWhenBudgetIsSpentPointsAtCachedContent(t *testing.T) {
	f := newFixture(t, []hub.Option{hub.WithAnonymousLimit(3)}, nil)
	cached := f.hub.Push(t, "library/cached", "v1", hub.Image(t, 1000, 1))
	if resp, _ := f.get(t, "GET", "/v2/library/cached/manifests/v1"); resp.StatusCode != 200 {
		t.Fatalf("warm-up: %d", resp.StatusCode)
	}
	for _, repo := range []string{"library/a", "library/b"} {
		f.hub.Push(t, repo, "v1", hub.Image(t, 1000, 1))
		f.get(t, "GET", "/v2/"+repo+"/manifests/v1")
	}
	f.hub.Retag(t, "library/cached", "v1", hub.Image(t, 1000, 1))
	f.clock.add(2 * time.Minute)
	resp, _ := f.get(t, "HEAD", "/v2/library/cached/manifests/v1")
	if resp.StatusCode != 200 || resp.Header.Get("Docker-Content-Digest") != cached.String() || !strings.Contains(resp.Header.Get("Warning"), "stale") {
		t.Fatalf("HEAD: %d %s %q; want the cached digest %s, stale", resp.StatusCode, resp.Header.Get("Docker-Content-Digest"), resp.Header.Get("Warning"), cached)
	}
	resp, body := f.get(t, "GET", "/v2/library/cached/manifests/"+cached.String())
	if resp.StatusCode != 200 || digest.FromBytes(body) != cached {
		t.Fatalf("GET by the digest HEAD gave: %d", resp.StatusCode)
	}
}

// TestHerdRedirects: with a herd tracker, the first node that asks for a
// blob is served; the next is told to ask the first (409 with its peer ID);
// the same node asking again with Shoal-Herd-Direct is served, and a
// client without the header always is; a range (a chunk of containerd's
// chunked fetch) is chained like the whole blob; a malformed peer ID is a
// 400.
func TestHerdRedirects(t *testing.T) {
	tr, err := herd.New(herd.Config{Direct: 1})
	if err != nil {
		t.Fatal(err)
	}
	f := newFixture(t, nil, func(c *cache.Config) { c.Herd = tr })
	img := hub.Image(t, 200_000, 1)
	f.hub.Push(t, "library/app", "v1", img)
	layers, _ := img.Layers()
	ld, _ := layers[0].Digest()
	path := "/v2/library/app/blobs/" + ld.String()

	resp, body := f.get(t, "GET", path, oci.HerdPeerHeader, "QmFirst", oci.HerdAddrsHeader, "/ip4/10.0.0.1/tcp/5001, /ip4/10.0.0.1/tcp/5001/p2p/QmFirst,bad addr,/x y")
	if resp.StatusCode != 200 || len(body) == 0 {
		t.Fatalf("first node: %d", resp.StatusCode)
	}
	resp, body = f.get(t, "GET", path, oci.HerdPeerHeader, "QmSecond")
	if resp.StatusCode != oci.HerdRedirectStatus || resp.Header.Get(oci.HerdReceiversHeader) != "QmFirst" || errCode(body) != string(oci.CodeUnavailable) {
		t.Fatalf("second node: %d %q %s", resp.StatusCode, resp.Header.Get(oci.HerdReceiversHeader), body)
	}
	// The first node's valid addresses, once each, naming it; the rest
	// dropped.
	if got, want := resp.Header.Get(oci.HerdReceiverAddrsHeader), "/ip4/10.0.0.1/tcp/5001/p2p/QmFirst"; got != want {
		t.Fatalf("second node told addresses %q, want %q", got, want)
	}
	resp, _ = f.get(t, "GET", path, oci.HerdPeerHeader, "QmThird", "Range", "bytes=10-")
	if resp.StatusCode != oci.HerdRedirectStatus || resp.Header.Get(oci.HerdReceiversHeader) != "QmSecond,QmFirst" {
		t.Fatalf("third node, a chunk: %d %q; want chained behind QmSecond", resp.StatusCode, resp.Header.Get(oci.HerdReceiversHeader))
	}
	for _, hdr := range [][]string{
		{oci.HerdPeerHeader, "QmSecond", oci.HerdDirectHeader, "1"},
		{},
	} {
		if resp, _ = f.get(t, "GET", path, hdr...); resp.StatusCode != 200 && resp.StatusCode != 206 {
			t.Fatalf("%v: %d, want served", hdr, resp.StatusCode)
		}
	}
	resp, body = f.get(t, "GET", path, oci.HerdPeerHeader, "not/an id")
	if resp.StatusCode != 400 || errCode(body) != string(oci.CodeUnsupported) {
		t.Fatalf("bad peer ID: %d %s", resp.StatusCode, body)
	}
}
