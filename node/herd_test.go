package node

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/shoal-oci/shoal/node/routing"
	"github.com/shoal-oci/shoal/node/store"
	"github.com/shoal-oci/shoal/oci"
)

// ingestStore is a memStore whose containerd is "receiving" one blob into a
// file the test grows.
type ingestStore struct {
	*memStore
	d     digest.Digest
	path  string
	total int64
}

func (s *ingestStore) OpenIngest(_ context.Context, d digest.Digest) (*os.File, int64, error) {
	if d != s.d {
		return nil, 0, store.ErrNotFound
	}
	f, err := os.Open(s.path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, 0, store.ErrNotFound
	}
	return f, s.total, err
}

func newIngestNode(t *testing.T, blob []byte) (*Node, *ingestStore, *os.File, *httptest.Server) {
	t.Helper()
	st := &ingestStore{memStore: newMemStore(), d: digest.FromBytes(blob), path: filepath.Join(t.TempDir(), "data"), total: int64(len(blob))}
	f, err := os.Create(st.path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	n, err := New(Config{Store: st, IdleTimeout: 2 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(n.PeerHandler())
	t.Cleanup(srv.Close)
	return n, st, f, srv
}

// waitInflight polls until n has served at least want bytes in flight.
func waitInflight(t *testing.T, n *Node, want float64) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for testutil.ToFloat64(n.metrics.inflightBytes) < want {
		if time.Now().After(deadline) {
			t.Fatalf("served %v bytes in flight, want %v", testutil.ToFloat64(n.metrics.inflightBytes), want)
		}
		time.Sleep(5 * time.Millisecond) // poll interval
	}
}

// TestInflightFollowsTheIngest: a peer asking for a blob this node's
// containerd is still receiving gets the whole blob as it is written, with
// the blob's Content-Length up front; a Range gets its part.
func TestInflightFollowsTheIngest(t *testing.T) {
	blob := randomBytes(t, 1<<20)
	n, st, f, srv := newIngestNode(t, blob)
	url := fmt.Sprintf("%s/v2/library/x/blobs/%s", srv.URL, st.d)

	resp, _ := get(t, http.MethodGet, url)
	if resp.StatusCode != http.StatusNotFound {
		t.Fatalf("blob not being received: status %d, want 404", resp.StatusCode)
	}

	done := n.receivingNow.add(st.d)
	defer done()
	type answer struct {
		resp *http.Response
		body []byte
		err  error
	}
	got := make(chan answer, 1)
	go func() {
		resp, err := http.Get(url)
		if err != nil {
			got <- answer{err: err}
			return
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		got <- answer{resp: resp, body: b, err: err}
	}()
	// Write the blob in three pieces, each after the last was served.
	cuts := []int{0, 300_000, 700_000, len(blob)}
	for i := 1; i < len(cuts); i++ {
		if _, err := f.Write(blob[cuts[i-1]:cuts[i]]); err != nil {
			t.Fatal(err)
		}
		waitInflight(t, n, float64(cuts[i]))
	}
	a := <-got
	if a.err != nil {
		t.Fatal(a.err)
	}
	if a.resp.StatusCode != http.StatusOK || a.resp.ContentLength != int64(len(blob)) || !slices.Equal(a.body, blob) {
		t.Fatalf("status %d, Content-Length %d, %d bytes (equal: %v); want 200 and the %d-byte blob",
			a.resp.StatusCode, a.resp.ContentLength, len(a.body), slices.Equal(a.body, blob), len(blob))
	}

	resp, body := get(t, http.MethodGet, url, "Range", "bytes=1000-")
	if resp.StatusCode != http.StatusPartialContent || !slices.Equal(body, blob[1000:]) ||
		resp.Header.Get("Content-Range") != fmt.Sprintf("bytes 1000-%d/%d", len(blob)-1, len(blob)) {
		t.Fatalf("range: status %d, Content-Range %q, %d bytes", resp.StatusCode, resp.Header.Get("Content-Range"), len(body))
	}
}

// TestInflightAbortsWhenTheIngestShrinksOrStalls: containerd starting the
// blob over, or no longer writing once this node's fetch has ended, cuts
// the response short: the peer sees a broken body, never a complete-looking
// one.
func TestInflightAbortsWhenTheIngestShrinksOrStalls(t *testing.T) {
	for _, tc := range []struct {
		name  string
		fault func(f *os.File) error
	}{
		{"shrinks", func(f *os.File) error { return f.Truncate(10) }},
		{"stalls", nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			blob := randomBytes(t, 200_000)
			n, st, f, srv := newIngestNode(t, blob)
			done := n.receivingNow.add(st.d)
			defer done()
			if _, err := f.Write(blob[:100_000]); err != nil {
				t.Fatal(err)
			}
			got := make(chan error, 1)
			go func() {
				resp, err := http.Get(fmt.Sprintf("%s/v2/library/x/blobs/%s", srv.URL, st.d))
				if err != nil {
					got <- err
					return
				}
				defer resp.Body.Close()
				b, err := io.ReadAll(resp.Body)
				if err == nil {
					err = fmt.Errorf("read the whole body: %d bytes", len(b))
				}
				got <- err
			}()
			waitInflight(t, n, 100_000)
			if tc.fault == nil {
				done() // the fetch ended with half the blob written
			} else if err := tc.fault(f); err != nil {
				t.Fatal(err)
			}
			select {
			case err := <-got:
				if !errors.Is(err, io.ErrUnexpectedEOF) {
					t.Fatalf("body read ended with %v, want an unexpected EOF", err)
				}
			case <-time.After(10 * time.Second):
				t.Fatal("the response did not end")
			}
		})
	}
}

// TestReceiversOf: only a herd redirect yields receivers, and only valid
// peer IDs, at most 8; each keeps the addresses that name it, and no
// address that names another peer or is no multiaddr.
func TestReceiversOf(t *testing.T) {
	redirect := func(ids, addrs string) error {
		e := oci.Errorf(oci.HerdRedirectStatus, oci.CodeUnavailable, "x")
		e.Header = http.Header{}
		e.Header.Set(oci.HerdReceiversHeader, ids)
		if addrs != "" {
			e.Header.Set(oci.HerdReceiverAddrsHeader, addrs)
		}
		return e
	}
	idsOf := func(rs []receiver) []string {
		var ids []string
		for _, r := range rs {
			ids = append(ids, r.id)
		}
		return ids
	}
	if rs := receiversOf(redirect("QmA, 12D3KooWB ,bad/id,,QmC", "")); !slices.Equal(idsOf(rs), []string{"QmA", "12D3KooWB", "QmC"}) {
		t.Fatalf("receivers %v", rs)
	}
	if rs := receiversOf(redirect("a,b,c,d,e,f,g,h,i,j", "")); len(rs) != 8 {
		t.Fatalf("%d receivers, want 8 at most", len(rs))
	}
	if rs := receiversOf(oci.ErrBlobUnknown); rs != nil {
		t.Fatalf("a 404 gave receivers %v", rs)
	}
	rs := receiversOf(redirect("QmA,QmB", "/ip4/10.0.0.1/tcp/5001/p2p/QmA, /ip4/10.0.0.2/tcp/5001/p2p/QmB,/ip4/10.0.0.3/tcp/5001/p2p/QmZ,/ip4/10.0.0.4/tcp/5001,/ip4/1 0/p2p/QmA"))
	if len(rs) != 2 || !slices.Equal(rs[0].addrs, []string{"/ip4/10.0.0.1/tcp/5001/p2p/QmA"}) || !slices.Equal(rs[1].addrs, []string{"/ip4/10.0.0.2/tcp/5001/p2p/QmB"}) {
		t.Fatalf("receivers with addresses %+v", rs)
	}
}

// TestRelayFromAReceiverSendsHeadersAtOnce: relaying from a node that is
// still receiving the blob, the headers reach the client as soon as the
// receiver sends its own, not with the first body bytes. Deep in a chain
// the first bytes take a hop per node ahead; without this, the tail of a
// 50-node herd waited past containerd's 30 s header timeout.
func TestRelayFromAReceiverSendsHeadersAtOnce(t *testing.T) {
	blob := randomBytes(t, 100_000)
	d := digest.FromBytes(blob)
	release := make(chan struct{})
	receiver := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		setBlobHeaders(w.Header(), d)
		w.Header().Set("Content-Length", fmt.Sprint(len(blob)))
		w.WriteHeader(http.StatusOK)
		w.(http.Flusher).Flush()
		<-release // the bytes are still on their way down the chain
		_, _ = w.Write(blob)
	}))
	t.Cleanup(receiver.Close)
	t.Cleanup(func() {
		select {
		case <-release:
		default:
			close(release)
		}
	})
	n, err := New(Config{Store: newMemStore(), IdleTimeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	rt := oci.Route{Kind: oci.KindBlob, Name: "library/x", Registry: "docker.io", Digest: d}
	front := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		targets := []target{{base: receiver.URL, client: receiver.Client(), receiving: true}}
		if err := n.relay(w, r, rt, targets, nil, sourceReceiver); err != nil {
			t.Errorf("relay: %v", err)
		}
	}))
	t.Cleanup(front.Close)

	got := make(chan *http.Response, 1)
	go func() {
		resp, err := http.Get(front.URL + "/v2/library/x/blobs/" + d.String())
		if err != nil {
			t.Error(err)
			close(got)
			return
		}
		got <- resp
	}()
	var resp *http.Response
	select {
	case resp = <-got:
	case <-time.After(5 * time.Second):
		t.Fatal("no headers from the relay while the receiver's bytes were on their way")
	}
	if resp == nil {
		t.FailNow()
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK || resp.ContentLength != int64(len(blob)) {
		t.Fatalf("status %d, Content-Length %d; want 200 and %d", resp.StatusCode, resp.ContentLength, len(blob))
	}
	close(release)
	body, err := io.ReadAll(resp.Body)
	if err != nil || !slices.Equal(body, blob) {
		t.Fatalf("body: %d bytes, %v", len(body), err)
	}
}

// herdFixedRouter is a fixedRouter that takes part in herds: it names
// itself and its addresses, and records the addresses it is asked to dial
// a receiver at.
type herdFixedRouter struct {
	fixedRouter
	receiver routing.Peer
	mu       sync.Mutex
	dialled  map[string][]string
}

func (r *herdFixedRouter) ID() string          { return "QmSelf" }
func (r *herdFixedRouter) DialAddrs() []string { return []string{"/ip4/10.0.0.1/tcp/5001"} }
func (r *herdFixedRouter) Peer(_ context.Context, id string, addrs []string) (routing.Peer, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.dialled == nil {
		r.dialled = map[string][]string{}
	}
	r.dialled[id] = addrs
	if id != r.receiver.ID {
		return routing.Peer{}, fmt.Errorf("no peer %s", id)
	}
	return r.receiver, nil
}

// TestHerdRedirectCarriesAddresses: a node's request to the cache tier
// gives its addresses; the cache tier's redirect names a receiver with its
// addresses, and the node dials the receiver at them and gets the blob.
func TestHerdRedirectCarriesAddresses(t *testing.T) {
	blob := randomBytes(t, 50_000)
	d := digest.FromBytes(blob)
	receiver := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		setBlobHeaders(w.Header(), d)
		w.Header().Set("Content-Length", fmt.Sprint(len(blob)))
		_, _ = w.Write(blob)
	}))
	t.Cleanup(receiver.Close)
	var gaveAddrs atomic.Value
	cacheTier := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		gaveAddrs.Store(r.Header.Get(oci.HerdAddrsHeader))
		w.Header().Set(oci.HerdReceiversHeader, "QmR")
		w.Header().Set(oci.HerdReceiverAddrsHeader, "/ip4/10.0.0.9/tcp/5001/p2p/QmR,/ip4/10.0.0.8/tcp/5001/p2p/QmOther")
		oci.WriteError(w, r, oci.Errorf(oci.HerdRedirectStatus, oci.CodeUnavailable, "ask the receivers"))
	}))
	t.Cleanup(cacheTier.Close)
	router := &herdFixedRouter{receiver: routing.Peer{ID: "QmR", Addr: receiver.URL}}
	n, err := New(Config{Store: newMemStore(), Router: router, CacheURL: cacheTier.URL})
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(n)
	t.Cleanup(srv.Close)
	resp, err := http.Get(srv.URL + "/v2/library/x/blobs/" + d.String() + "?ns=docker.io")
	if err != nil {
		t.Fatal(err)
	}
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil || resp.StatusCode != http.StatusOK || !slices.Equal(body, blob) {
		t.Fatalf("GET: %d, %d bytes, %v", resp.StatusCode, len(body), err)
	}
	if got := gaveAddrs.Load(); got != "/ip4/10.0.0.1/tcp/5001" {
		t.Errorf("the node gave the cache tier addresses %q, want its own", got)
	}
	router.mu.Lock()
	defer router.mu.Unlock()
	if got := router.dialled["QmR"]; !slices.Equal(got, []string{"/ip4/10.0.0.9/tcp/5001/p2p/QmR"}) {
		t.Errorf("the receiver was dialled at %v, want the addresses the cache tier gave for it", got)
	}
}
