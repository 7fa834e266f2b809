package node

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/shoal-oci/shoal/node/routing"
	"github.com/shoal-oci/shoal/node/store"
	"github.com/shoal-oci/shoal/oci"
)

// Metric label values for where a response came from.
const (
	sourceLocal = "local"
	sourcePeer  = "peer"
	sourceCache = "cache"
	sourceMiss  = "miss"
)

// chunkRcvBuf is the receive buffer of peer connections that serve an
// open-ended range. A client such as containerd's chunked fetch reads its
// chunk and hangs up; whatever the peer sent beyond it was wasted uplink.
// Linux doubles it, and 1 MiB in flight still fills a 10 Gbit/s LAN link.
const chunkRcvBuf = 128 << 10

// Node is the per-node mirror. It implements http.Handler for the registry
// port and runs the advertiser that keeps the DHT in step with the store.
type Node struct {
	cfg     Config
	allowed map[string]bool // nil: every registry
	picker  *routing.Picker
	metrics *metrics
	peers   *http.Client
	cache   *http.Client
	dialer  *net.Dialer // raw peer connections, for splice
	// chunkDialer is for open-ended ranges (containerd's chunked fetch): a
	// small receive buffer bounds what a peer has sent past the chunk that
	// the client will read before it hangs up.
	chunkDialer *net.Dialer
	bufs        sync.Pool // *[2][]byte: the hashing relay's copy buffers
	// stripeBufs holds *[]byte segment buffers of striped fetches.
	stripeBufs sync.Pool
	synced     atomic.Bool
	// receivingNow counts the blobs this node's containerd is fetching.
	receivingNow receiving
	// policies are the sources each kind of request tries, in order
	// (policyFor); they depend on the configuration only.
	policies [numRequestKinds][]step
}

// New builds a Node. It registers its metrics on cfg.Registerer.
func New(cfg Config) (*Node, error) {
	if cfg.Store == nil {
		return nil, errors.New("node: a Store is required")
	}
	cfg.setDefaults()
	m, err := newMetrics(cfg.Registerer)
	if err != nil {
		return nil, fmt.Errorf("node: register metrics: %w", err)
	}
	var allowed map[string]bool
	for _, r := range cfg.Registries {
		reg, err := oci.NormalizeRegistry(r)
		if err != nil {
			return nil, fmt.Errorf("node: registry %q: %w", r, err)
		}
		if allowed == nil {
			allowed = map[string]bool{}
		}
		allowed[reg] = true
	}
	n := &Node{
		cfg:     cfg,
		allowed: allowed,
		picker:  routing.NewPicker(cfg.Zone, cfg.PeerCoolDown, time.Now),
		metrics: m,
		peers:   &http.Client{Transport: cfg.PeerTransport, CheckRedirect: noRedirects},
		cache:   &http.Client{Transport: cfg.CacheTransport, CheckRedirect: noRedirects},
		dialer:  &net.Dialer{Timeout: 500 * time.Millisecond, KeepAlive: 30 * time.Second},
		chunkDialer: &net.Dialer{Timeout: 500 * time.Millisecond, KeepAlive: 30 * time.Second,
			Control: func(_, _ string, c syscall.RawConn) error {
				var serr error
				err := c.Control(func(fd uintptr) {
					serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, chunkRcvBuf)
				})
				return errors.Join(err, serr)
			}},
		bufs: sync.Pool{New: func() any {
			return &[2][]byte{make([]byte, relayChunk), make([]byte, 0, relayChunk)}
		}},
	}
	for k := range n.policies {
		n.policies[k] = n.policyFor(requestKind(k))
	}
	return n, nil
}

func noRedirects(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }

// newTransport is a transport for in-cluster hops: short dial and header
// timeouts so a dead peer costs little, and no timeout on a long body.
func newTransport(dial time.Duration) *http.Transport {
	return &http.Transport{
		Proxy:                 nil, // cluster-internal hops never go through an HTTP proxy
		DialContext:           (&net.Dialer{Timeout: dial, KeepAlive: 30 * time.Second}).DialContext,
		MaxIdleConnsPerHost:   16,
		IdleConnTimeout:       90 * time.Second,
		ResponseHeaderTimeout: 10 * time.Second,
		ForceAttemptHTTP2:     false,
		DisableCompression:    true,
		WriteBufferSize:       64 << 10,
		ReadBufferSize:        64 << 10,
	}
}

// ServeHTTP serves the registry API (/v2/, manifests and blobs) to this
// node's containerd, from the sources policy lists (source.go).
func (n *Node) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	n.handle(w, r, r.Header.Get(PeerHeader) != "")
}

// PeerHandler serves other nodes: this node's own content only, never a
// relay onward. With a PeerKey every request must carry a valid credential
// (auth.PeerHeader), or it is refused with 401.
func (n *Node) PeerHandler() http.Handler {
	return n.cfg.PeerKey.Middleware(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n.handle(w, r, true)
	}), nil)
}

func (n *Node) handle(w http.ResponseWriter, r *http.Request, fromPeer bool) {
	w.Header().Set("Docker-Distribution-API-Version", "registry/2.0")
	if err := n.serve(w, r, fromPeer); err != nil {
		if errors.Is(err, errClientGone) {
			n.cfg.Logger.DebugContext(r.Context(), "client closed the response early", "path", r.URL.Path)
			return
		}
		var oe *oci.Error
		if !errors.As(err, &oe) || oe.Status >= 500 {
			n.cfg.Logger.WarnContext(r.Context(), "request failed", "method", r.Method, "path", r.URL.Path, "err", err)
		}
		oci.WriteError(w, r, err)
	}
}

func (n *Node) serve(w http.ResponseWriter, r *http.Request, fromPeer bool) error {
	rt, err := oci.ParseRoute(r)
	if err != nil {
		return err
	}
	if rt.Kind == oci.KindBase {
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Content-Length", "2")
		w.WriteHeader(http.StatusOK)
		if r.Method == http.MethodGet {
			_, _ = io.WriteString(w, "{}")
		}
		return nil
	}
	if n.allowed != nil && !n.allowed[rt.Registry] {
		return oci.Errorf(http.StatusNotFound, oci.CodeNameUnknown, "registry %s is not mirrored by this node", rt.Registry)
	}
	kind := kindLabel(rt)
	if !fromPeer && rt.Kind == oci.KindBlob && r.Method == http.MethodGet {
		// containerd may be writing what this request brings into its
		// ingest: peers in a herd may be sent here for it meanwhile.
		defer n.receivingNow.add(rt.Digest)()
	}
	src, err := n.serveFrom(w, r, rt, n.policies[kindOf(rt, fromPeer)])
	if err != nil && src == "" {
		src = sourceMiss
	}
	n.metrics.requests.WithLabelValues(src, kind).Inc()
	return err
}

func kindLabel(rt oci.Route) string {
	if rt.Kind == oci.KindBlob {
		return "blob"
	}
	return "manifest"
}

// serveLocal serves content from the store. http.ServeContent handles
// HEAD, Range and conditional requests, and sends an *os.File with sendfile.
func (n *Node) serveLocal(w http.ResponseWriter, r *http.Request, rt oci.Route, desc ocispec.Descriptor) error {
	ctx := r.Context()
	mt := desc.MediaType
	if rt.Kind == oci.KindManifest && !oci.IsManifestMediaType(mt) {
		sniffed, err := n.sniff(ctx, desc)
		if err != nil {
			return err
		}
		if sniffed == "" {
			return oci.ErrManifestUnknown
		}
		mt = sniffed
	}
	if rt.Kind == oci.KindBlob || mt == "" {
		mt = "application/octet-stream"
	}
	var length = desc.Size
	if rh := r.Header.Get("Range"); rh != "" {
		br, ok, err := oci.ParseRange(rh, desc.Size)
		if err != nil {
			return err
		}
		if ok {
			length = br.Length()
		}
	}
	f, err := n.cfg.Store.Open(ctx, desc.Digest)
	if err != nil {
		if errors.Is(err, store.ErrNotFound) {
			return oci.ErrBlobUnknown
		}
		return fmt.Errorf("open %s: %w", desc.Digest, err)
	}
	defer f.Close()
	h := w.Header()
	h.Set("Content-Type", mt)
	h.Set("Docker-Content-Digest", desc.Digest.String())
	h.Set("Etag", `"`+desc.Digest.String()+`"`)
	h.Set("Accept-Ranges", "bytes")
	http.ServeContent(w, r, "", time.Time{}, f)
	if r.Method == http.MethodGet {
		n.metrics.bytes.WithLabelValues(sourceLocal).Add(float64(length))
	}
	return nil
}

func (n *Node) sniff(ctx context.Context, desc ocispec.Descriptor) (string, error) {
	if desc.Size > oci.MaxManifestSize {
		return "", nil
	}
	f, err := n.cfg.Store.Open(ctx, desc.Digest)
	if err != nil {
		return "", fmt.Errorf("open %s: %w", desc.Digest, err)
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, oci.MaxManifestSize))
	if err != nil {
		return "", fmt.Errorf("read %s: %w", desc.Digest, err)
	}
	return oci.SniffManifestMediaType(b), nil
}

// relayPeers looks key up in the DHT and relays the request to the peers that hold it.
func (n *Node) relayPeers(w http.ResponseWriter, r *http.Request, rt oci.Route, key string) error {
	if n.cfg.Router == nil {
		return errNoSource
	}
	lctx, cancel := context.WithTimeout(r.Context(), n.cfg.LookupTimeout)
	start := time.Now()
	peers, err := n.cfg.Router.Lookup(lctx, key, n.cfg.MaxPeers)
	cancel()
	n.metrics.lookup.Observe(time.Since(start).Seconds())
	if err != nil {
		n.cfg.Logger.InfoContext(r.Context(), "peer lookup failed", "key", key, "err", err)
		return errNoSource
	}
	peers = n.picker.Order(peers)
	if len(peers) == 0 {
		return errNoSource
	}
	targets := make([]target, len(peers))
	for i := range peers {
		p := peers[i]
		targets[i] = target{base: p.Addr, client: n.peers, peer: &p}
	}
	// A blob broken mid-stream resumes on the other peers, then on the
	// cache tier, which is asked to serve the rest itself: a node resuming
	// has the start already, and no chain of a herd may hold it up.
	return n.relay(w, r, rt, targets, n.directCacheTargets(), sourcePeer)
}

// morePeers looks rt's blob up again before a resume and adds holders that
// are neither in left nor among tried, ahead of the cache tier. A lookup
// answers as soon as it knows one holder, so the first answer may have
// named fewer than the DHT knows by now.
func (n *Node) morePeers(ctx context.Context, rt oci.Route, left []target, tried []*routing.Peer) []target {
	if n.cfg.Router == nil {
		return left
	}
	known := map[string]bool{}
	for _, p := range tried {
		known[p.ID] = true
	}
	var peers, rest []target
	for _, t := range left {
		if t.peer != nil {
			known[t.peer.ID] = true
			peers = append(peers, t)
		} else {
			rest = append(rest, t)
		}
	}
	lctx, cancel := context.WithTimeout(ctx, n.cfg.LookupTimeout)
	found, err := n.cfg.Router.Lookup(lctx, rt.Digest.String(), n.cfg.MaxPeers)
	cancel()
	if err != nil {
		return left
	}
	for _, p := range n.picker.Order(found) {
		if !known[p.ID] {
			peers = append(peers, target{base: p.Addr, client: n.peers, peer: &p})
		}
	}
	return append(peers, rest...)
}

// forget tells the router that p answered 404 for rt's key.
func (n *Node) forget(rt oci.Route, p routing.Peer) {
	f, ok := n.cfg.Router.(forgetter)
	if !ok {
		return
	}
	key := rt.Digest.String()
	if rt.Tag != "" {
		key = rt.Reference()
	}
	f.Forget(key, p.ID)
}

// cacheTargets is the cache tier as a relay target, or none.
func (n *Node) cacheTargets() []target {
	if n.cfg.CacheURL == "" {
		return nil
	}
	return []target{{base: n.cfg.CacheURL, client: n.cache}}
}

// directCacheTargets is the cache tier asked to serve, never to send this
// node to the nodes receiving the blob (oci/herd.go), or none.
func (n *Node) directCacheTargets() []target {
	ts := n.cacheTargets()
	for i := range ts {
		ts[i].direct = true
	}
	return ts
}

func contentLength(resp *http.Response) (int64, error) {
	v := resp.Header.Get("Content-Length")
	if v == "" {
		return -1, nil
	}
	l, err := strconv.ParseInt(v, 10, 64)
	if err != nil || l < 0 {
		return 0, fmt.Errorf("bad Content-Length %q", v)
	}
	return l, nil
}

// ready reports whether the first store snapshot reached the router.
func (n *Node) ready() bool { return n.synced.Load() }

// digestOf returns the route's digest, or the one the response declares.
func digestOf(rt oci.Route, resp *http.Response) (digest.Digest, error) {
	if rt.Digest != "" {
		if h := resp.Header.Get("Docker-Content-Digest"); h != "" && h != rt.Digest.String() {
			return "", fmt.Errorf("source answered %s with digest %s", rt.Digest, h)
		}
		return rt.Digest, nil
	}
	d, err := digest.Parse(resp.Header.Get("Docker-Content-Digest"))
	if err != nil {
		return "", fmt.Errorf("source gave no valid Docker-Content-Digest for %s", rt.Reference())
	}
	return d, nil
}
