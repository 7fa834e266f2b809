package node

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/shoal-oci/shoal/node/routing"
	"github.com/shoal-oci/shoal/node/store"
)

// memStore is a narrow in-memory Store for handler unit tests; the real
// implementations are tested against real containerd and layouts.
type memStore struct {
	mu      sync.Mutex
	content map[digest.Digest][]byte
	types   map[digest.Digest]string
	tags    map[string]digest.Digest
}

func newMemStore() *memStore {
	return &memStore{content: map[digest.Digest][]byte{}, types: map[digest.Digest]string{}, tags: map[string]digest.Digest{}}
}

func (s *memStore) add(b []byte, mt string) digest.Digest {
	s.mu.Lock()
	defer s.mu.Unlock()
	d := digest.FromBytes(b)
	s.content[d], s.types[d] = b, mt
	return d
}

func (s *memStore) tag(ref string, d digest.Digest) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.tags[ref] = d
}

func (s *memStore) Resolve(_ context.Context, ref string) (digest.Digest, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if d, ok := s.tags[ref]; ok {
		return d, nil
	}
	return "", fmt.Errorf("%s: %w", ref, store.ErrNotFound)
}

func (s *memStore) Stat(_ context.Context, d digest.Digest) (ocispec.Descriptor, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	b, ok := s.content[d]
	if !ok {
		return ocispec.Descriptor{}, fmt.Errorf("%s: %w", d, store.ErrNotFound)
	}
	return ocispec.Descriptor{Digest: d, Size: int64(len(b)), MediaType: s.types[d]}, nil
}

type nopSeekCloser struct{ *bytes.Reader }

func (nopSeekCloser) Close() error { return nil }

func (s *memStore) Open(_ context.Context, d digest.Digest) (io.ReadSeekCloser, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	b, ok := s.content[d]
	if !ok {
		return nil, fmt.Errorf("%s: %w", d, store.ErrNotFound)
	}
	return nopSeekCloser{bytes.NewReader(b)}, nil
}

func (s *memStore) Watch(ctx context.Context, ch chan<- store.Event) error {
	s.mu.Lock()
	var keys []string
	for d := range s.content {
		keys = append(keys, d.String())
	}
	for t := range s.tags {
		keys = append(keys, t)
	}
	s.mu.Unlock()
	select {
	case ch <- store.Event{Kind: store.Snapshot, Keys: keys}:
	case <-ctx.Done():
	}
	<-ctx.Done()
	return nil
}

type testNode struct {
	*Node
	store  *memStore
	router *routing.MemoryRouter
	srv    *httptest.Server
}

// cluster starts n nodes on loopback that share one in-memory DHT.
func cluster(t *testing.T, n int, mutate func(i int, c *Config)) []*testNode {
	t.Helper()
	net := routing.NewMemoryNetwork()
	nodes := make([]*testNode, n)
	for i := range nodes {
		tn := &testNode{store: newMemStore()}
		h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { tn.ServeHTTP(w, r) })
		tn.srv = httptest.NewServer(h)
		t.Cleanup(tn.srv.Close)
		tn.router = net.Node(routing.Peer{ID: fmt.Sprintf("node-%d", i), Addr: tn.srv.URL})
		cfg := Config{Store: tn.store, Router: tn.router, HedgeDelay: 50 * time.Millisecond}
		if mutate != nil {
			mutate(i, &cfg)
		}
		nd, err := New(cfg)
		if err != nil {
			t.Fatal(err)
		}
		tn.Node = nd
		nodes[i] = tn
	}
	return nodes
}

func get(t *testing.T, method, url string, hdr ...string) (*http.Response, []byte) {
	t.Helper()
	req, _ := http.NewRequest(method, url, nil)
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, url, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return resp, nil
	}
	return resp, b
}

func wantOCIError(t *testing.T, resp *http.Response, body []byte, status int, code string) {
	t.Helper()
	if resp.StatusCode != status {
		t.Fatalf("status %d, want %d (%s)", resp.StatusCode, status, body)
	}
	var env struct{ Errors []struct{ Code string } }
	if err := json.Unmarshal(body, &env); err != nil || len(env.Errors) == 0 || env.Errors[0].Code != code {
		t.Fatalf("body %q, want code %s", body, code)
	}
}

func randomBytes(t *testing.T, n int) []byte {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return b
}

const manifestJSON = `{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{},"layers":[]}`

func TestHandler(t *testing.T) {
	blob := randomBytes(t, 300_000)
	t.Run("local_blob_with_headers_and_ranges", func(t *testing.T) {
		nodes := cluster(t, 1, nil)
		d := nodes[0].store.add(blob, "")
		u := nodes[0].srv.URL + "/v2/library/x/blobs/" + d.String()
		resp, body := get(t, "GET", u)
		if resp.StatusCode != 200 || !bytes.Equal(body, blob) {
			t.Fatalf("status %d, %d bytes", resp.StatusCode, len(body))
		}
		for k, v := range map[string]string{"Docker-Content-Digest": d.String(), "Content-Length": fmt.Sprint(len(blob)), "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"} {
			if got := resp.Header.Get(k); got != v {
				t.Errorf("%s = %q, want %q", k, got, v)
			}
		}
		resp, body = get(t, "GET", u, "Range", "bytes=10-19")
		if resp.StatusCode != 206 || !bytes.Equal(body, blob[10:20]) || resp.Header.Get("Content-Range") != fmt.Sprintf("bytes 10-19/%d", len(blob)) {
			t.Fatalf("range: %d %q", resp.StatusCode, resp.Header.Get("Content-Range"))
		}
		resp, body = get(t, "GET", u, "Range", fmt.Sprintf("bytes=%d-", len(blob)))
		wantOCIError(t, resp, body, 416, "RANGE_INVALID")
		resp, body = get(t, "HEAD", u)
		if resp.StatusCode != 200 || len(body) != 0 || resp.Header.Get("Content-Length") != fmt.Sprint(len(blob)) {
			t.Fatalf("HEAD: %d len %s", resp.StatusCode, resp.Header.Get("Content-Length"))
		}
	})
	t.Run("local_manifest_by_tag", func(t *testing.T) {
		nodes := cluster(t, 1, nil)
		d := nodes[0].store.add([]byte(manifestJSON), ocispec.MediaTypeImageManifest)
		nodes[0].store.tag("docker.io/library/alpine:3", d)
		resp, body := get(t, "GET", nodes[0].srv.URL+"/v2/library/alpine/manifests/3?ns=docker.io")
		if resp.StatusCode != 200 || string(body) != manifestJSON || resp.Header.Get("Docker-Content-Digest") != d.String() || resp.Header.Get("Content-Type") != ocispec.MediaTypeImageManifest {
			t.Fatalf("%d %v", resp.StatusCode, resp.Header)
		}
		resp, body = get(t, "GET", nodes[0].srv.URL+"/v2/library/alpine/manifests/3?ns=ghcr.io")
		wantOCIError(t, resp, body, 404, "MANIFEST_UNKNOWN")
	})
	t.Run("blob_route_does_not_serve_a_blob_as_manifest", func(t *testing.T) {
		nodes := cluster(t, 1, nil)
		d := nodes[0].store.add(blob, "")
		resp, body := get(t, "GET", nodes[0].srv.URL+"/v2/x/manifests/"+d.String())
		wantOCIError(t, resp, body, 404, "MANIFEST_UNKNOWN")
	})
	t.Run("peer_blob_is_relayed", func(t *testing.T) {
		nodes := cluster(t, 2, nil)
		d := nodes[0].store.add(blob, "")
		if err := nodes[0].router.Advertise(context.Background(), []string{d.String()}); err != nil {
			t.Fatal(err)
		}
		resp, body := get(t, "GET", nodes[1].srv.URL+"/v2/library/x/blobs/"+d.String())
		if resp.StatusCode != 200 || !bytes.Equal(body, blob) || resp.Header.Get("Docker-Content-Digest") != d.String() {
			t.Fatalf("status %d, %d bytes", resp.StatusCode, len(body))
		}
		resp, body = get(t, "GET", nodes[1].srv.URL+"/v2/library/x/blobs/"+d.String(), "Range", "bytes=5-9")
		if resp.StatusCode != 206 || !bytes.Equal(body, blob[5:10]) {
			t.Fatalf("peer range: %d", resp.StatusCode)
		}
	})
	t.Run("peer_requests_never_loop", func(t *testing.T) {
		nodes := cluster(t, 2, nil)
		d := digest.FromBytes(blob)
		// Both advertise a digest neither holds: a loop would bounce forever.
		for _, n := range nodes {
			_ = n.router.Advertise(context.Background(), []string{d.String()})
		}
		done := make(chan struct{})
		go func() {
			defer close(done)
			resp, body := get(t, "GET", nodes[1].srv.URL+"/v2/x/blobs/"+d.String())
			wantOCIError(t, resp, body, 404, "BLOB_UNKNOWN")
		}()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			t.Fatal("request between peers did not finish")
		}
	})
	t.Run("cluster_miss_without_cache_is_404", func(t *testing.T) {
		nodes := cluster(t, 2, nil)
		resp, body := get(t, "GET", nodes[1].srv.URL+"/v2/x/blobs/"+digest.FromString("nope").String())
		wantOCIError(t, resp, body, 404, "BLOB_UNKNOWN")
		resp, body = get(t, "GET", nodes[1].srv.URL+"/v2/x/manifests/v1")
		wantOCIError(t, resp, body, 404, "MANIFEST_UNKNOWN")
	})
	t.Run("with_verify_blobs_corrupt_peer_bytes_never_look_complete", func(t *testing.T) {
		nodes := cluster(t, 2, func(_ int, c *Config) { c.VerifyBlobs = true })
		// Larger than the relay's held-back chunk, so the response starts.
		blob := randomBytes(t, 3*relayChunk)
		good := nodes[0].store.add(blob, "")
		// Node 0 now serves wrong bytes under the right digest.
		bad := append([]byte{}, blob...)
		bad[len(bad)/2] ^= 0xff
		nodes[0].store.mu.Lock()
		nodes[0].store.content[good] = bad
		nodes[0].store.mu.Unlock()
		_ = nodes[0].router.Advertise(context.Background(), []string{good.String()})
		resp, err := http.Get(nodes[1].srv.URL + "/v2/x/blobs/" + good.String())
		if err != nil {
			t.Fatalf("the relay must start before the digest can be checked: %v", err)
		}
		defer resp.Body.Close()
		// The relay did start: a 404 or another error would prove nothing.
		if resp.StatusCode != 200 || resp.ContentLength != int64(len(blob)) {
			t.Fatalf("status %d, Content-Length %d; want the relay to start with 200 and %d", resp.StatusCode, resp.ContentLength, len(blob))
		}
		body, err := io.ReadAll(resp.Body)
		if err == nil {
			t.Fatalf("corrupt bytes ended in a clean EOF after %d of %d bytes; want a cut connection", len(body), len(blob))
		}
		if len(body) >= len(blob) {
			t.Fatal("corrupt bytes were delivered as a complete body")
		}
	})
	t.Run("resume_on_another_peer_after_break", func(t *testing.T) {
		big := randomBytes(t, 4<<20)
		d := digest.FromBytes(big)
		var brokeOnce atomic.Bool
		// A flaky peer that sends half, then cuts the connection.
		flaky := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.Header.Get("Range") != "" || brokeOnce.Load() {
				http.Error(w, "gone", 500)
				return
			}
			brokeOnce.Store(true)
			w.Header().Set("Content-Length", fmt.Sprint(len(big)))
			w.Header().Set("Docker-Content-Digest", d.String())
			w.WriteHeader(200)
			_, _ = w.Write(big[:len(big)/2])
			w.(http.Flusher).Flush()
			panic(http.ErrAbortHandler)
		}))
		defer flaky.Close()
		nodes := cluster(t, 2, nil)
		nodes[0].store.add(big, "")
		_ = nodes[0].router.Advertise(context.Background(), []string{d.String()})
		// The flaky peer comes first, node 0 second.
		flakyPeer := routing.Peer{ID: "flaky", Addr: flaky.URL}
		router := &fixedRouter{peers: []routing.Peer{flakyPeer, nodes[0].router.Self()}}
		n1, err := New(Config{Store: newMemStore(), Router: router, HedgeDelay: time.Second})
		if err != nil {
			t.Fatal(err)
		}
		srv := httptest.NewServer(n1)
		defer srv.Close()
		resp, body := get(t, "GET", srv.URL+"/v2/x/blobs/"+d.String())
		if resp.StatusCode != 200 || !bytes.Equal(body, big) {
			t.Fatalf("status %d, %d bytes, equal=%v", resp.StatusCode, len(body), bytes.Equal(body, big))
		}
		if !brokeOnce.Load() {
			t.Fatal("the flaky peer was never used")
		}
	})
	t.Run("tag_goes_to_cache_tier_first", func(t *testing.T) {
		cacheManifest := []byte(strings.Replace(manifestJSON, `"layers":[]`, `"layers":[],"annotations":{"from":"cache"}`, 1))
		cd := digest.FromBytes(cacheManifest)
		var hits atomic.Int32
		var ns atomic.Value
		cache := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			hits.Add(1)
			ns.Store(r.URL.Query().Get("ns"))
			w.Header().Set("Content-Type", ocispec.MediaTypeImageManifest)
			w.Header().Set("Docker-Content-Digest", cd.String())
			w.Header().Set("Content-Length", fmt.Sprint(len(cacheManifest)))
			_, _ = w.Write(cacheManifest)
		}))
		defer cache.Close()
		nodes := cluster(t, 1, func(_ int, c *Config) { c.CacheURL = cache.URL })
		old := nodes[0].store.add([]byte(manifestJSON), ocispec.MediaTypeImageManifest)
		nodes[0].store.tag("ghcr.io/org/app:latest", old)
		resp, body := get(t, "GET", nodes[0].srv.URL+"/v2/org/app/manifests/latest?ns=ghcr.io")
		if resp.StatusCode != 200 || !bytes.Equal(body, cacheManifest) || hits.Load() != 1 || ns.Load() != "ghcr.io" {
			t.Fatalf("status %d hits %d ns %v body %s", resp.StatusCode, hits.Load(), ns.Load(), body)
		}
	})
	t.Run("tag_falls_back_to_local_when_cache_is_down", func(t *testing.T) {
		cache := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { http.Error(w, "down", 503) }))
		defer cache.Close()
		nodes := cluster(t, 1, func(_ int, c *Config) { c.CacheURL = cache.URL })
		d := nodes[0].store.add([]byte(manifestJSON), ocispec.MediaTypeImageManifest)
		nodes[0].store.tag("docker.io/library/alpine:3", d)
		resp, body := get(t, "GET", nodes[0].srv.URL+"/v2/library/alpine/manifests/3")
		if resp.StatusCode != 200 || string(body) != manifestJSON {
			t.Fatalf("status %d", resp.StatusCode)
		}
	})
	t.Run("tag_and_digest_unknown_to_cache_tier_are_404", func(t *testing.T) {
		// The cache tier's 404 is an answer: the node passes on "unknown"
		// (containerd moves to its next host on 404), never a 500.
		cache := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(http.StatusNotFound)
			_, _ = io.WriteString(w, `{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}`)
		}))
		defer cache.Close()
		for _, trust := range []bool{false, true} {
			nodes := cluster(t, 2, func(_ int, c *Config) { c.CacheURL = cache.URL; c.TrustPeerTags = trust })
			resp, body := get(t, "GET", nodes[0].srv.URL+"/v2/library/nothere/manifests/v1")
			wantOCIError(t, resp, body, 404, "MANIFEST_UNKNOWN")
			resp, body = get(t, "GET", nodes[0].srv.URL+"/v2/library/nothere/manifests/"+digest.FromString("x").String())
			wantOCIError(t, resp, body, 404, "MANIFEST_UNKNOWN")
			resp, body = get(t, "GET", nodes[0].srv.URL+"/v2/library/nothere/blobs/"+digest.FromString("x").String())
			wantOCIError(t, resp, body, 404, "BLOB_UNKNOWN")
		}
	})
	t.Run("digest_miss_goes_to_cache_tier", func(t *testing.T) {
		d := digest.FromBytes(blob)
		cache := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if !strings.HasSuffix(r.URL.Path, d.String()) {
				http.NotFound(w, r)
				return
			}
			w.Header().Set("Docker-Content-Digest", d.String())
			http.ServeContent(w, r, "", time.Time{}, bytes.NewReader(blob))
		}))
		defer cache.Close()
		nodes := cluster(t, 2, func(_ int, c *Config) { c.CacheURL = cache.URL })
		resp, body := get(t, "GET", nodes[1].srv.URL+"/v2/x/blobs/"+d.String())
		if resp.StatusCode != 200 || !bytes.Equal(body, blob) {
			t.Fatalf("status %d", resp.StatusCode)
		}
	})
	t.Run("bad_input", func(t *testing.T) {
		nodes := cluster(t, 1, nil)
		base := nodes[0].srv.URL
		for _, tc := range []struct {
			method, path string
			status       int
			code         string
		}{
			{"GET", "/v2/x/blobs/sha256:123", 400, "DIGEST_INVALID"},
			{"GET", "/v2/a/../b/manifests/v1", 400, "NAME_INVALID"},
			{"GET", "/v2/" + strings.Repeat("n", 300) + "/manifests/v1", 400, "NAME_INVALID"},
			{"DELETE", "/v2/x/manifests/v1", 405, "UNSUPPORTED"},
			{"PUT", "/v2/x/blobs/uploads/", 405, "UNSUPPORTED"},
			{"GET", "/v2/x/manifests/v1?ns=" + strings.Repeat("a", 4000), 414, "NAME_INVALID"},
			{"GET", "/v2/x/manifests/v1?ns=" + strings.Repeat("a", 300), 400, "NAME_INVALID"},
		} {
			resp, body := get(t, tc.method, base+tc.path)
			wantOCIError(t, resp, body, tc.status, tc.code)
		}
	})
}

// fixedRouter returns a fixed peer list, for tests that need a given order.
type fixedRouter struct{ peers []routing.Peer }

func (f *fixedRouter) Advertise(context.Context, []string) error { return nil }
func (f *fixedRouter) Withdraw(context.Context, []string) error  { return nil }
func (f *fixedRouter) Lookup(context.Context, string, int) ([]routing.Peer, error) {
	return f.peers, nil
}

func TestAdvertiserDiff(t *testing.T) {
	set := map[string]struct{}{}
	add, rm := diff(set, store.Event{Kind: store.Snapshot, Keys: []string{"a", "b"}})
	if len(add) != 2 || len(rm) != 0 {
		t.Fatalf("snapshot: %v %v", add, rm)
	}
	add, rm = diff(set, store.Event{Kind: store.Added, Keys: []string{"b", "c"}})
	if fmt.Sprint(add) != "[c]" || len(rm) != 0 {
		t.Fatalf("added: %v %v", add, rm)
	}
	add, rm = diff(set, store.Event{Kind: store.Removed, Keys: []string{"a", "z"}})
	if len(add) != 0 || fmt.Sprint(rm) != "[a]" {
		t.Fatalf("removed: %v %v", add, rm)
	}
	add, rm = diff(set, store.Event{Kind: store.Snapshot, Keys: []string{"c", "d"}})
	if fmt.Sprint(add) != "[d]" || fmt.Sprint(rm) != "[b]" {
		t.Fatalf("resync: %v %v", add, rm)
	}
}
