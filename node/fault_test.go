package node

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/shoal-oci/shoal/auth"
	"github.com/shoal-oci/shoal/node/routing"
)

// faultPeer is a misbehaving peer: an HTTP server that counts its requests.
type faultPeer struct {
	srv  *httptest.Server
	hits atomic.Int32
}

func newFaultPeer(t *testing.T, h http.HandlerFunc) *faultPeer {
	t.Helper()
	p := &faultPeer{}
	p.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		p.hits.Add(1)
		h(w, r)
	}))
	t.Cleanup(p.srv.Close)
	return p
}

func (p *faultPeer) peer() routing.Peer { return routing.Peer{ID: "bad-" + p.srv.URL, Addr: p.srv.URL} }

// faultFixture is a requesting node whose lookups return the bad peer first
// and a healthy peer (a real node holding blob) second.
type faultFixture struct {
	srv  *httptest.Server
	node *Node
	good *testNode
	d    digest.Digest
}

func newFaultFixture(t *testing.T, blob []byte, bad *faultPeer, mutate func(*Config)) *faultFixture {
	t.Helper()
	nodes := cluster(t, 1, nil)
	d := nodes[0].store.add(blob, "")
	peers := []routing.Peer{nodes[0].router.Self()}
	if bad != nil {
		peers = append([]routing.Peer{bad.peer()}, peers...)
	}
	cfg := Config{Store: newMemStore(), Router: &fixedRouter{peers: peers}, HedgeDelay: 5 * time.Second, IdleTimeout: 300 * time.Millisecond}
	if mutate != nil {
		mutate(&cfg)
	}
	n, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(n)
	t.Cleanup(srv.Close)
	return &faultFixture{srv: srv, node: n, good: nodes[0], d: d}
}

func (f *faultFixture) pull(t *testing.T, want []byte, hdr ...string) {
	t.Helper()
	resp, body := get(t, "GET", f.srv.URL+"/v2/x/blobs/"+f.d.String(), hdr...)
	if resp.StatusCode/100 != 2 || !bytes.Equal(body, want) {
		t.Fatalf("pull: status %d, %d bytes (want %d), identical=%v", resp.StatusCode, len(body), len(want), bytes.Equal(body, want))
	}
}

// Every way a peer can misbehave before or during its body ends in a
// complete, byte-identical pull from the next source; the bad peer is
// cooled down, so the next pull does not ask it again.
func TestPeerFaults_PullCompletesFromNextSource(t *testing.T) {
	blob := randomBytes(t, 1<<20)
	d := digest.FromBytes(blob)
	serve := func(w http.ResponseWriter, n int) {
		w.Header().Set("Content-Length", fmt.Sprint(len(blob)))
		w.Header().Set("Docker-Content-Digest", d.String())
		w.WriteHeader(200)
		_, _ = w.Write(blob[:n])
		w.(http.Flusher).Flush()
	}
	cases := []struct {
		name string
		h    http.HandlerFunc
	}{
		{"status_500", func(w http.ResponseWriter, r *http.Request) { http.Error(w, "restarting", 500) }},
		{"status_400", func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(400)
			_, _ = io.WriteString(w, `{"errors":[{"code":"DIGEST_INVALID","message":"nope"}]}`)
		}},
		{"status_403", func(w http.ResponseWriter, r *http.Request) { http.Error(w, "denied", 403) }},
		{"claims_empty", func(w http.ResponseWriter, r *http.Request) {
			// Found by FuzzPeerResponse: a 200 with no bytes for a blob
			// that is not the empty one.
			w.Header().Set("Content-Length", "0")
			w.WriteHeader(200)
		}},
		{"chunked_no_length", func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Docker-Content-Digest", d.String())
			w.WriteHeader(200)
			_, _ = w.Write(blob[:1000])
			w.(http.Flusher).Flush()
			_, _ = w.Write(blob[1000:])
		}},
		{"wrong_digest_header", func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Docker-Content-Digest", digest.FromString("other").String())
			_, _ = w.Write(blob)
		}},
		{"partial_answer_to_whole_request", func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Range", fmt.Sprintf("bytes 0-99/%d", len(blob)))
			w.Header().Set("Content-Length", "100")
			w.WriteHeader(206)
			_, _ = w.Write(blob[:100])
		}},
		{"garbage_response", func(w http.ResponseWriter, r *http.Request) {
			conn, _, _ := w.(http.Hijacker).Hijack()
			_, _ = conn.Write([]byte("this is not HTTP at all\r\n\r\n"))
			conn.Close()
		}},
		{"huge_headers", func(w http.ResponseWriter, r *http.Request) {
			conn, _, _ := w.(http.Hijacker).Hijack()
			defer conn.Close()
			_, _ = io.WriteString(conn, "HTTP/1.1 200 OK\r\n")
			line := "X-Pad: " + strings.Repeat("a", 1000) + "\r\n"
			for range 200 { // 200 KB of headers, more than any real peer sends
				if _, err := io.WriteString(conn, line); err != nil {
					return
				}
			}
		}},
		{"short_body", func(w http.ResponseWriter, r *http.Request) {
			if r.Header.Get("Range") != "" {
				http.Error(w, "no", 500)
				return
			}
			serve(w, len(blob)/3)
			panic(http.ErrAbortHandler)
		}},
		{"stall_after_headers", func(w http.ResponseWriter, r *http.Request) {
			serve(w, 0)
			<-r.Context().Done()
		}},
		{"stall_mid_body", func(w http.ResponseWriter, r *http.Request) {
			serve(w, len(blob)/2)
			<-r.Context().Done()
		}},
	}
	for _, verify := range []bool{false, true} {
		for _, tc := range cases {
			t.Run(fmt.Sprintf("%s/verify=%v", tc.name, verify), func(t *testing.T) {
				bad := newFaultPeer(t, tc.h)
				f := newFaultFixture(t, blob, bad, func(c *Config) { c.VerifyBlobs = verify })
				f.pull(t, blob)
				if bad.hits.Load() != 1 {
					t.Fatalf("bad peer hit %d times in one pull, want 1", bad.hits.Load())
				}
				f.pull(t, blob)
				if bad.hits.Load() != 1 {
					t.Fatalf("bad peer asked again on the next pull: it was not cooled down")
				}
			})
		}
	}
}

// A 404 from a peer (a record it no longer holds) costs one round trip and
// no cool-down: the peer may hold other content.
func TestPeerStale404_NoCoolDown(t *testing.T) {
	blob := randomBytes(t, 64<<10)
	bad := newFaultPeer(t, func(w http.ResponseWriter, r *http.Request) { http.NotFound(w, r) })
	f := newFaultFixture(t, blob, bad, nil)
	f.pull(t, blob)
	if bad.hits.Load() != 1 {
		t.Fatalf("stale peer hit %d times, want 1", bad.hits.Load())
	}
	if got := f.node.picker.Order([]routing.Peer{bad.peer()}); len(got) != 1 {
		t.Fatal("a 404 put the peer in cool-down")
	}
}

// A client that closes the connection mid-blob (containerd's chunked fetch
// does so after each chunk) does not cool the serving peer down.
func TestClientClosesMidStream_PeerNotCooledDown(t *testing.T) {
	blob := randomBytes(t, 8<<20)
	var hits atomic.Int32
	nodes := cluster(t, 1, nil)
	d := nodes[0].store.add(blob, "")
	// The holder, counted.
	holder := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hits.Add(1)
		nodes[0].ServeHTTP(w, r)
	}))
	defer holder.Close()
	n, err := New(Config{Store: newMemStore(), Router: &fixedRouter{peers: []routing.Peer{{ID: "holder", Addr: holder.URL}}}})
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(n)
	defer srv.Close()
	for i := range 3 {
		req, _ := http.NewRequest("GET", srv.URL+"/v2/x/blobs/"+d.String(), nil)
		req.Header.Set("Range", fmt.Sprintf("bytes=%d-", i*1000))
		resp, err := http.DefaultTransport.(*http.Transport).Clone().RoundTrip(req)
		if err != nil {
			t.Fatal(err)
		}
		if resp.StatusCode != 206 {
			t.Fatalf("chunk %d: status %d", i, resp.StatusCode)
		}
		buf := make([]byte, 64<<10)
		if _, err := io.ReadFull(resp.Body, buf); err != nil || !bytes.Equal(buf, blob[i*1000:i*1000+len(buf)]) {
			t.Fatalf("chunk %d: %v", i, err)
		}
		resp.Body.Close() // like containerd after its chunk
	}
	if hits.Load() != 3 {
		t.Fatalf("holder asked %d times for 3 chunks: a closed client cooled it down", hits.Load())
	}
}

// A peer that breaks mid-stream when no other peer holds the blob resumes
// from the cache tier.
func TestPeerBreaksMidStream_ResumesFromCacheTier(t *testing.T) {
	blob := randomBytes(t, 2<<20)
	d := digest.FromBytes(blob)
	var ranges atomic.Value
	cache := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ranges.Store(r.Header.Get("Range"))
		w.Header().Set("Docker-Content-Digest", d.String())
		http.ServeContent(w, r, "", time.Time{}, bytes.NewReader(blob))
	}))
	defer cache.Close()
	bad := newFaultPeer(t, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", fmt.Sprint(len(blob)))
		w.WriteHeader(200)
		_, _ = w.Write(blob[:len(blob)/2])
		w.(http.Flusher).Flush()
		panic(http.ErrAbortHandler)
	})
	n, err := New(Config{Store: newMemStore(), Router: &fixedRouter{peers: []routing.Peer{bad.peer()}}, CacheURL: cache.URL})
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(n)
	defer srv.Close()
	resp, body := get(t, "GET", srv.URL+"/v2/x/blobs/"+d.String())
	if resp.StatusCode != 200 || !bytes.Equal(body, blob) {
		t.Fatalf("status %d, %d bytes", resp.StatusCode, len(body))
	}
	if r, _ := ranges.Load().(string); !strings.HasPrefix(r, "bytes=") || r == "bytes=0-" {
		t.Fatalf("cache tier got Range %q, want the rest of the blob", r)
	}
}

// With --verify-blobs, a peer whose bytes fail the digest is cooled down, so
// the client's retry is served by a healthy peer.
func TestVerifyBlobs_CorruptPeerCooledDownRetrySucceeds(t *testing.T) {
	blob := randomBytes(t, 512<<10)
	d := digest.FromBytes(blob)
	corrupt := append([]byte{}, blob...)
	corrupt[len(corrupt)/2] ^= 0xff
	bad := newFaultPeer(t, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Docker-Content-Digest", d.String())
		http.ServeContent(w, r, "", time.Time{}, bytes.NewReader(corrupt))
	})
	f := newFaultFixture(t, blob, bad, func(c *Config) { c.VerifyBlobs = true })
	resp, err := http.Get(f.srv.URL + "/v2/x/blobs/" + d.String())
	if err == nil {
		b, rerr := io.ReadAll(resp.Body)
		resp.Body.Close()
		if rerr == nil && len(b) == len(blob) {
			t.Fatal("corrupt bytes were delivered as a complete body")
		}
	}
	f.pull(t, blob) // the retry
	if bad.hits.Load() != 1 {
		t.Fatalf("corrupt peer asked %d times; want once, then cooled down", bad.hits.Load())
	}
}

// A tag is answered by peers only when the node trusts them (a PSK
// network); otherwise a cluster-wide tag miss is a 404, whatever a peer
// would answer.
func TestPeerTags_OnlyWhenTrusted(t *testing.T) {
	for _, trusted := range []bool{false, true} {
		t.Run(fmt.Sprintf("trusted=%v", trusted), func(t *testing.T) {
			nodes := cluster(t, 2, func(_ int, c *Config) { c.TrustPeerTags = trusted })
			md := nodes[0].store.add([]byte(manifestJSON), ocispec.MediaTypeImageManifest)
			nodes[0].store.tag("docker.io/library/evil:latest", md)
			_ = nodes[0].router.Advertise(context.Background(), []string{"docker.io/library/evil:latest", md.String()})
			resp, body := get(t, "GET", nodes[1].srv.URL+"/v2/library/evil/manifests/latest")
			if trusted {
				if resp.StatusCode != 200 || string(body) != manifestJSON {
					t.Fatalf("trusted peer tag: %d", resp.StatusCode)
				}
				return
			}
			wantOCIError(t, resp, body, 404, "MANIFEST_UNKNOWN")
			// A digest still comes from any peer: it is verified.
			resp, body = get(t, "GET", nodes[1].srv.URL+"/v2/library/evil/manifests/"+md.String())
			if resp.StatusCode != 200 || string(body) != manifestJSON {
				t.Fatalf("manifest by digest from a peer: %d", resp.StatusCode)
			}
		})
	}
}

// The peer port serves only requests signed with the cluster's key; a node
// with the key pulls through it, an unsigned client or a node with another
// key gets nothing (401 on the port; a cluster-wide miss for the node).
func TestPeerPort_OnlyAuthenticatedPeers(t *testing.T) {
	blob := randomBytes(t, 256<<10)
	key := auth.NewPeerKey(bytes.Repeat([]byte{7}, 32))
	wrong := auth.NewPeerKey(bytes.Repeat([]byte{8}, 32))
	holder, err := New(Config{Store: newMemStore(), PeerKey: key})
	if err != nil {
		t.Fatal(err)
	}
	d := holder.cfg.Store.(*memStore).add(blob, "")
	peerSrv := httptest.NewServer(holder.PeerHandler())
	defer peerSrv.Close()
	for _, tc := range []struct {
		name string
		key  auth.PeerKey
		ok   bool
	}{{"same_key", key, true}, {"other_key", wrong, false}, {"no_key", auth.PeerKey{}, false}} {
		t.Run(tc.name, func(t *testing.T) {
			n, err := New(Config{Store: newMemStore(), PeerKey: tc.key,
				Router: &fixedRouter{peers: []routing.Peer{{ID: "holder", Addr: peerSrv.URL}}}})
			if err != nil {
				t.Fatal(err)
			}
			srv := httptest.NewServer(n)
			defer srv.Close()
			resp, body := get(t, "GET", srv.URL+"/v2/x/blobs/"+d.String())
			if tc.ok {
				if resp.StatusCode != 200 || !bytes.Equal(body, blob) {
					t.Fatalf("authenticated pull: %d", resp.StatusCode)
				}
				return
			}
			wantOCIError(t, resp, body, 404, "BLOB_UNKNOWN")
		})
	}
	resp, body := get(t, "GET", peerSrv.URL+"/v2/x/blobs/"+d.String())
	wantOCIError(t, resp, body, 401, "UNAUTHORIZED")
	// The peer port never relays onward, even for a signed request.
	req, _ := http.NewRequest("GET", peerSrv.URL+"/v2/x/blobs/"+digest.FromString("elsewhere").String(), nil)
	key.Sign(req, time.Now())
	r2, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	r2.Body.Close()
	if r2.StatusCode != 404 {
		t.Fatalf("signed request for content the holder lacks: %d, want 404", r2.StatusCode)
	}
}
