package node

import (
	"bytes"
	"fmt"
	"net/http"
	"net/http/httptest"
	"sync/atomic"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/shoal-oci/shoal/node/routing"
)

// stripeFixture is a requesting node and holders of one blob, each a real
// node handler behind a server that counts requests and can misbehave.
type stripeFixture struct {
	srv     *httptest.Server
	node    *Node
	holders []*stripeHolder
	d       digest.Digest
	blob    []byte
}

type stripeHolder struct {
	srv   *httptest.Server
	hits  atomic.Int32
	bytes atomic.Int64
	// ranged counts the requests with a Range header: the stripes asked of
	// this holder.
	ranged atomic.Int32
	// fault, when set, handles the request instead (after counting).
	fault atomic.Pointer[http.HandlerFunc]
	// failRanges makes every request with a Range header fail with 500.
	failRanges atomic.Bool
}

type countingWriter struct {
	http.ResponseWriter
	n *atomic.Int64
}

func (c countingWriter) Write(p []byte) (int, error) {
	k, err := c.ResponseWriter.Write(p)
	c.n.Add(int64(k))
	return k, err
}

func (c countingWriter) Flush() {
	if f, ok := c.ResponseWriter.(http.Flusher); ok {
		f.Flush()
	}
}

func newStripeFixture(t *testing.T, size, holders int, mutate func(*Config)) *stripeFixture {
	t.Helper()
	blob := randomBytes(t, size)
	nodes := cluster(t, 1, nil)
	d := nodes[0].store.add(blob, "")
	f := &stripeFixture{d: d, blob: blob}
	var peers []routing.Peer
	for i := range holders {
		h := &stripeHolder{}
		h.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			h.hits.Add(1)
			if r.Header.Get("Range") != "" {
				h.ranged.Add(1)
			}
			if fault := h.fault.Load(); fault != nil {
				(*fault)(w, r)
				return
			}
			if h.failRanges.Load() && r.Header.Get("Range") != "" {
				http.Error(w, "gone", http.StatusInternalServerError)
				return
			}
			nodes[0].ServeHTTP(countingWriter{w, &h.bytes}, r)
		}))
		t.Cleanup(h.srv.Close)
		f.holders = append(f.holders, h)
		peers = append(peers, routing.Peer{ID: fmt.Sprintf("holder-%d", i), Addr: h.srv.URL})
	}
	cfg := Config{
		Store: newMemStore(), Router: &fixedRouter{peers: peers},
		StripeMinSize: 1 << 20, StripeChunk: 256 << 10, HedgeDelay: 50 * time.Millisecond,
		IdleTimeout: 500 * time.Millisecond,
	}
	if mutate != nil {
		mutate(&cfg)
	}
	n, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	f.node = n
	f.srv = httptest.NewServer(n)
	t.Cleanup(f.srv.Close)
	return f
}

func (f *stripeFixture) url() string { return f.srv.URL + "/v2/x/blobs/" + f.d.String() }

func striped(t *testing.T, n *Node) float64 {
	t.Helper()
	return testutil.ToFloat64(n.metrics.striped)
}

// A large blob held by three peers comes from all three, byte-identical,
// in both relay modes; a small one, or a containerd chunk request, comes
// from one.
func TestStriping_SpreadsOverHoldersByteIdentical(t *testing.T) {
	for _, verify := range []bool{false, true} {
		t.Run(fmt.Sprintf("verify=%v", verify), func(t *testing.T) {
			f := newStripeFixture(t, 4<<20+123, 3, func(c *Config) { c.VerifyBlobs = verify })
			resp, body := get(t, "GET", f.url())
			if resp.StatusCode != 200 || !bytes.Equal(body, f.blob) {
				t.Fatalf("status %d, %d bytes, identical=%v", resp.StatusCode, len(body), bytes.Equal(body, f.blob))
			}
			if resp.Header.Get("Content-Length") != fmt.Sprint(len(f.blob)) {
				t.Fatalf("Content-Length %q", resp.Header.Get("Content-Length"))
			}
			// What a holder wrote is no measure of what the node used: the
			// first holder's whole-blob answer fills loopback's socket
			// buffers (megabytes) before the node takes its first stripe
			// and hangs up. The stripes asked of each holder are.
			for i, h := range f.holders {
				if h.bytes.Load() == 0 {
					t.Errorf("holder %d served nothing", i)
				}
			}
			asked := 0
			for _, h := range f.holders {
				if h.ranged.Load() > 0 {
					asked++
				}
			}
			if asked < len(f.holders)-1 { // all but, at most, the first to answer
				t.Errorf("%d of %d holders were asked for stripes", asked, len(f.holders))
			}
			if v := striped(t, f.node); v != 1 {
				t.Errorf("striped transfers = %v, want 1", v)
			}
			// A closed range within the blob is striped too and exact.
			resp, body = get(t, "GET", f.url(), "Range", "bytes=100-3000000")
			if resp.StatusCode != 206 || !bytes.Equal(body, f.blob[100:3000001]) {
				t.Fatalf("range: status %d, %d bytes", resp.StatusCode, len(body))
			}
			if cr := resp.Header.Get("Content-Range"); cr != fmt.Sprintf("bytes 100-3000000/%d", len(f.blob)) {
				t.Fatalf("Content-Range %q", cr)
			}
			// An open-ended range is a containerd chunk: one source.
			before := striped(t, f.node)
			resp, body = get(t, "GET", f.url(), "Range", "bytes=1000-")
			if resp.StatusCode != 206 || !bytes.Equal(body, f.blob[1000:]) {
				t.Fatalf("open range: status %d, %d bytes", resp.StatusCode, len(body))
			}
			if striped(t, f.node) != before {
				t.Error("an open-ended range was striped")
			}
		})
	}
	t.Run("small blob", func(t *testing.T) {
		f := newStripeFixture(t, 512<<10, 3, nil)
		resp, body := get(t, "GET", f.url())
		if resp.StatusCode != 200 || !bytes.Equal(body, f.blob) {
			t.Fatalf("status %d", resp.StatusCode)
		}
		if v := striped(t, f.node); v != 0 {
			t.Errorf("a blob under StripeMinSize was striped")
		}
	})
}

// A holder that fails or stalls mid-transfer hands its segments to the
// others: the pull completes byte-identical, and the bad holder is cooled
// down.
func TestStriping_FailingOrSlowPeerSegmentsMove(t *testing.T) {
	cases := map[string]http.HandlerFunc{
		"500": func(w http.ResponseWriter, r *http.Request) {
			http.Error(w, "boom", http.StatusInternalServerError)
		},
		"short body": func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Length", "262144")
			w.Header().Set("Content-Range", r.Header.Get("Range"))
			w.WriteHeader(http.StatusPartialContent)
			_, _ = w.Write(make([]byte, 1000))
			panic(http.ErrAbortHandler)
		},
		"stall": func(w http.ResponseWriter, r *http.Request) {
			<-r.Context().Done()
		},
	}
	for name, fault := range cases {
		t.Run(name, func(t *testing.T) {
			f := newStripeFixture(t, 4<<20, 3, nil)
			// The first request goes to holder 0 (the picker keeps ties in
			// order), so striping starts; holder 1 misbehaves on its ranges.
			f.holders[1].fault.Store(&fault)
			resp, body := get(t, "GET", f.url())
			if resp.StatusCode != 200 || !bytes.Equal(body, f.blob) {
				t.Fatalf("status %d, %d bytes, identical=%v", resp.StatusCode, len(body), bytes.Equal(body, f.blob))
			}
			if f.holders[1].hits.Load() == 0 {
				t.Fatal("the bad holder was never asked: the test proves nothing")
			}
			if got := f.node.picker.Order([]routing.Peer{{ID: "holder-1"}}); len(got) != 0 && name != "stall" {
				t.Errorf("the bad holder is not cooled down")
			}
		})
	}
}

// When every striping peer fails, the rest comes from the cache tier.
func TestStriping_AllPeersFailRestFromCacheTier(t *testing.T) {
	var cacheHits atomic.Int32
	var blob []byte
	var d digest.Digest
	cache := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		cacheHits.Add(1)
		w.Header().Set("Docker-Content-Digest", d.String())
		http.ServeContent(w, r, "", time.Time{}, bytes.NewReader(blob))
	}))
	defer cache.Close()
	f := newStripeFixture(t, 4<<20, 2, func(c *Config) { c.CacheURL = cache.URL })
	blob, d = f.blob, f.d
	// The holders answer the first, whole-blob request (so striping
	// starts), and fail every range request after it.
	for _, h := range f.holders {
		h.failRanges.Store(true)
	}
	resp, body := get(t, "GET", f.url())
	if resp.StatusCode != 200 || !bytes.Equal(body, f.blob) {
		t.Fatalf("status %d, %d bytes, identical=%v", resp.StatusCode, len(body), bytes.Equal(body, f.blob))
	}
	if striped(t, f.node) != 1 {
		t.Fatal("the transfer was not striped: the test proves nothing")
	}
	if cacheHits.Load() == 0 {
		t.Fatal("the cache tier was never asked")
	}
}
