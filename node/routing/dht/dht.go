// Package dht is the node tier's Router on a libp2p Kademlia DHT (kad-dht in
// server mode, protocol prefix "/shoal", TCP only), with gossipsub
// announcements and a provider cache in front of it.
//
// Keys (digests "sha256:..." and tag references) become CIDv1 with the raw
// codec over the sha256 multihash of the key string.
//
// Finding a key costs, in order of preference:
//   - nothing beyond a map lookup, when an announcement or an earlier
//     lookup told this node who holds it (the provider cache, see
//     providers.go). Content is immutable, so a holder stays a holder until
//     it withdraws the key, a request to it finds nothing (Forget), or it
//     cannot be reached;
//   - a DHT query, for keys this node has not heard of: nodes that joined
//     after the announcement, or missed it. Lookup returns as soon as one
//     reachable provider is in hand; the rest of the query goes on in the
//     background and fills the cache.
//
// Advertise hands keys to kad-dht's sweeping provider, which re-provides
// them region by region every ProviderTTL/2, so keeping records alive costs
// a steady trickle of messages rather than a burst of per-key lookups. Every
// node keeps provider records for ProviderTTL (records.ProvideValidity). A
// withdrawn key is announced as removed at once; its DHT records expire
// within one TTL, and until then cost a requester one 404. A dead node is
// not what the TTL is for: a provider that cannot be dialled is marked dead
// and skipped by every lookup until it connects again, so it costs at most
// one failed dial.
//
// Peers learn each other's registry address and zone from the identify
// UserAgent, "shoal/1 registry=<host:port> zone=<zone>" (see agent.go).
package dht

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strings"
	"sync"
	"time"

	"github.com/ipfs/go-cid"
	"github.com/libp2p/go-libp2p"
	kad "github.com/libp2p/go-libp2p-kad-dht"
	"github.com/libp2p/go-libp2p-kad-dht/provider"
	"github.com/libp2p/go-libp2p-kad-dht/records"
	pubsub "github.com/libp2p/go-libp2p-pubsub"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/pnet"
	"github.com/libp2p/go-libp2p/p2p/protocol/identify"
	"github.com/libp2p/go-libp2p/p2p/security/noise"
	"github.com/libp2p/go-libp2p/p2p/transport/tcp"
	ma "github.com/multiformats/go-multiaddr"
	manet "github.com/multiformats/go-multiaddr/net"
	mh "github.com/multiformats/go-multihash"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/shoal-oci/shoal/node/routing"
	"github.com/shoal-oci/shoal/node/routing/dht/wire"
)

// Defaults for the zero values of Config.
const (
	DefaultListenAddr        = "0.0.0.0:5001"
	DefaultProviderTTL       = 30 * time.Minute
	DefaultBootstrapInterval = 30 * time.Second
	DefaultDialTimeout       = 2 * time.Second
	DefaultLookupTimeout     = 5 * time.Second
	DefaultProviderCacheKeys = 1 << 18
	DefaultReplicationFactor = 20
	deadPeerProbeInterval    = 30 * time.Second
	deadPeerForgetAfter      = 10 * time.Minute
)

// Config configures a Router. Only RegistryAddr is required.
type Config struct {
	// ListenAddr is the libp2p TCP listen address, a multiaddr
	// ("/ip4/0.0.0.0/tcp/5001") or host:port ("0.0.0.0:5001"). Default
	// DefaultListenAddr. Port 0 picks a free port (see Addrs).
	ListenAddr string
	// DataDir holds the node's identity key (file "identity.key", created
	// 0600 on first start and reused after, so the peer ID survives
	// restarts). Empty means a new identity on every start.
	DataDir string
	// PSK, when set, must be 32 bytes: only nodes with the same key can
	// connect (libp2p private network).
	PSK []byte
	// BootstrapPeers are multiaddrs (with or without /p2p/<id>), host:port
	// pairs, or DNS names with a port (re-resolved every
	// BootstrapInterval). See bootstrap.go.
	BootstrapPeers []string
	// BootstrapInterval is how often BootstrapPeers are resolved and
	// dialled again. Default DefaultBootstrapInterval.
	BootstrapInterval time.Duration
	// RegistryAddr is host:port of this node's HTTP registry. Peers build
	// Peer.Addr as "http://<host>:<port>"; an empty or unspecified host
	// (":5000", "0.0.0.0:5000") is replaced by the IP of the libp2p
	// connection.
	RegistryAddr string
	// Zone is this node's topology zone, "" if none.
	Zone string
	// ProviderTTL is how long every node keeps a provider record. Keys are
	// re-provided every ProviderTTL/2 by the sweeping provider. It bounds
	// how long a withdrawn key's records linger in the DHT (each costs a
	// requester one 404); dead nodes are skipped by reachability, not by
	// the TTL. Default DefaultProviderTTL.
	ProviderTTL time.Duration
	// ReplicationFactor is how many of the closest peers get each provider
	// record. Default DefaultReplicationFactor: half of kad-dht's 20, which
	// is sized for the churn of the open internet; in a cluster nodes are
	// stable, each holder keeps its own record, and every record costs its
	// keepers about 230 bytes each.
	ReplicationFactor int
	// ProviderCacheKeys bounds how many keys the provider cache remembers
	// holders for (about 100 bytes each). Default DefaultProviderCacheKeys.
	ProviderCacheKeys int
	// DialTimeout bounds one dial: of a bootstrap peer, or of a provider
	// during Lookup. Default DefaultDialTimeout.
	DialTimeout time.Duration
	// LookupTimeout bounds one Lookup. Default DefaultLookupTimeout.
	LookupTimeout time.Duration
	// Resolver resolves bootstrap DNS names. Default net.DefaultResolver.
	Resolver *net.Resolver
	// Logger receives the router's logs. Default: discarded.
	Logger *slog.Logger
	// Registerer receives the router's and libp2p's metrics. Nil: none are
	// registered.
	Registerer prometheus.Registerer
}

// Router announces and finds keys in the DHT. It implements the node's
// Router interface (Advertise, Withdraw, Lookup). Create it with New and
// stop it with Close.
type Router struct {
	cfg      Config
	log      *slog.Logger
	host     host.Host
	dht      *kad.IpfsDHT
	prov     *provider.SweepingProvider
	topic    *pubsub.Topic
	cache    *providerCache
	live     *liveness
	metrics  *metrics
	resolver *net.Resolver

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	probing map[peer.ID]bool // peers probeSoon is dialling; under mu
	// holdingsAsked marks peers whose holdings were fetched or are being
	// fetched (under mu); holdingsSem bounds the fetches in flight.
	holdingsAsked map[peer.ID]bool
	holdingsSem   chan struct{}

	annMu     sync.Mutex
	annLive   bool      // announcements go out at once (the mesh is up)
	pending   [][]byte  // announcements held back until then
	meshSince time.Time // when the topic first had peers; maintainLoop only

	mu           sync.Mutex
	keys         map[keyHash]struct{} // advertised keys
	bootstrapped map[peer.ID]peer.AddrInfo
	closed       bool
}

// New starts a libp2p host and DHT node and begins bootstrapping in the
// background (see Ready). ctx is used for start-up only; the router runs
// until Close.
func New(ctx context.Context, cfg Config) (*Router, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	cfg = withDefaults(cfg)
	if cfg.RegistryAddr == "" {
		return nil, errors.New("dht: RegistryAddr is required")
	}
	if _, _, err := net.SplitHostPort(cfg.RegistryAddr); err != nil {
		return nil, fmt.Errorf("dht: registry address: %w", err)
	}
	if err := validateAgentField("registry address", cfg.RegistryAddr); err != nil {
		return nil, fmt.Errorf("dht: %w", err)
	}
	if err := validateAgentField("zone", cfg.Zone); err != nil {
		return nil, fmt.Errorf("dht: %w", err)
	}
	if len(cfg.PSK) != 0 && len(cfg.PSK) != 32 {
		return nil, fmt.Errorf("dht: PSK must be 32 bytes, got %d", len(cfg.PSK))
	}
	for _, entry := range cfg.BootstrapPeers {
		if err := validateEntry(entry); err != nil {
			return nil, fmt.Errorf("dht: %w", err)
		}
	}
	listen, err := listenMultiaddr(cfg.ListenAddr)
	if err != nil {
		return nil, fmt.Errorf("dht: %w", err)
	}
	sk, err := loadIdentity(cfg.DataDir)
	if err != nil {
		return nil, fmt.Errorf("dht: %w", err)
	}
	m, err := newMetrics(cfg.Registerer)
	if err != nil {
		return nil, fmt.Errorf("dht: %w", err)
	}

	opts := []libp2p.Option{
		libp2p.Identity(sk),
		libp2p.ListenAddrs(listen),
		libp2p.NoTransports,
		// No SO_REUSEPORT: dialling from the listen port makes a
		// redial after a closed connection reuse its 4-tuple, which the
		// other side may still hold in TIME_WAIT, and the dial then stalls
		// (go-libp2p's known reuseport issue). A cluster has no NAT whose
		// hole it would punch.
		libp2p.Transport(tcp.NewTCPTransport, tcp.DisableReuseport()),
		// Noise only: go-libp2p's TLS session keeps a read buffer of up
		// to a record (16 KiB and more) for the life of each connection,
		// where Noise takes one from a pool per frame and gives it back.
		// A node keeps a connection to most of the cluster, so at 50
		// nodes that was 4 MiB of an idle node's heap.
		libp2p.Security(noise.ID, noise.New),
		libp2p.DisableRelay(),
		libp2p.UserAgent(agentString(cfg.RegistryAddr, cfg.Zone)),
		libp2p.WithDialTimeout(cfg.DialTimeout),
	}
	if len(cfg.PSK) != 0 {
		opts = append(opts, libp2p.PrivateNetwork(pnet.PSK(cfg.PSK)))
	}
	if cfg.Registerer != nil {
		opts = append(opts, libp2p.PrometheusRegisterer(cfg.Registerer))
	} else {
		opts = append(opts, libp2p.DisableMetrics())
	}
	h, err := libp2p.New(opts...)
	if err != nil {
		return nil, fmt.Errorf("dht: start libp2p host: %w", err)
	}

	rctx, cancel := context.WithCancel(context.Background())
	r := &Router{
		cfg:           cfg,
		log:           cfg.Logger,
		host:          h,
		metrics:       m,
		resolver:      cfg.Resolver,
		ctx:           rctx,
		cancel:        cancel,
		cache:         newProviderCache(cfg.ProviderCacheKeys, cfg.ProviderTTL, time.Now),
		live:          newLiveness(time.Now),
		keys:          make(map[keyHash]struct{}),
		probing:       make(map[peer.ID]bool),
		holdingsAsked: make(map[peer.ID]bool),
		holdingsSem:   make(chan struct{}, holdingsParallel),
		bootstrapped:  make(map[peer.ID]peer.AddrInfo),
	}
	r.dht, err = kad.New(h,
		kad.Mode(kad.ModeServer),
		kad.ProtocolPrefix("/shoal"),
		kad.ProviderDatastore(newRecordStore()),
		kad.ProviderManagerOpts(
			records.ProvideValidity(cfg.ProviderTTL),
			records.ProviderAddrTTL(cfg.ProviderTTL),
			records.CleanupInterval(cfg.ProviderTTL),
		),
		kad.BootstrapPeersFunc(r.bootstrapPeers),
	)
	if err != nil {
		cancel()
		h.Close()
		return nil, fmt.Errorf("dht: start kad-dht: %w", err)
	}
	self := h.ID()
	r.prov, err = provider.New(
		provider.WithHost(h),
		provider.WithRouter(r.dht),
		provider.WithMessageSender(r.dht.MessageSender()),
		provider.WithSelfAddrs(h.Addrs),
		provider.WithAddLocalRecord(func(ctx context.Context, k mh.Multihash) error {
			return r.dht.ProviderStore().AddProvider(ctx, k, peer.AddrInfo{ID: self})
		}),
		provider.WithReplicationFactor(cfg.ReplicationFactor),
		provider.WithReprovideInterval(cfg.ProviderTTL/2),
		provider.WithMaxReprovideDelay(max(cfg.ProviderTTL/8, time.Second)),
		provider.WithSendProviderRecordTimeout(max(cfg.DialTimeout, time.Second)),
		provider.WithLoggerName("shoal-dht-provider"),
	)
	if err == nil {
		err = r.startAnnouncements(rctx)
	}
	if err != nil {
		if r.prov != nil {
			r.prov.Close()
		}
		cancel()
		r.dht.Close()
		h.Close()
		return nil, fmt.Errorf("dht: %w", err)
	}
	h.SetStreamHandler(holdingsProtocol, r.serveHoldings)
	h.Network().Notify(&network.NotifyBundle{
		ConnectedF: func(_ network.Network, c network.Conn) {
			r.live.markAlive(c.RemotePeer())
			r.holdingsSoon(c.RemotePeer())
		},
		// A peer whose last connection closed is dialled again at once, off
		// the request path: a node that died (its connections reset) is
		// marked dead within one dial, before any lookup offers it.
		DisconnectedF: func(nw network.Network, c network.Conn) {
			if id := c.RemotePeer(); nw.Connectedness(id) != network.Connected {
				r.probeSoon(id)
			}
		},
	})
	r.log.Info("dht started", "peer", h.ID(), "addrs", r.Addrs(), "zone", cfg.Zone, "provider_ttl", cfg.ProviderTTL)

	r.wg.Add(2)
	go r.bootstrapLoop()
	go r.maintainLoop()
	return r, nil
}

func withDefaults(cfg Config) Config {
	if cfg.ListenAddr == "" {
		cfg.ListenAddr = DefaultListenAddr
	}
	if cfg.ProviderTTL <= 0 {
		cfg.ProviderTTL = DefaultProviderTTL
	}
	if cfg.BootstrapInterval <= 0 {
		cfg.BootstrapInterval = DefaultBootstrapInterval
	}
	if cfg.DialTimeout <= 0 {
		cfg.DialTimeout = DefaultDialTimeout
	}
	if cfg.LookupTimeout <= 0 {
		cfg.LookupTimeout = DefaultLookupTimeout
	}
	if cfg.ReplicationFactor <= 0 {
		cfg.ReplicationFactor = DefaultReplicationFactor
	}
	if cfg.ProviderCacheKeys <= 0 {
		cfg.ProviderCacheKeys = DefaultProviderCacheKeys
	}
	if cfg.Resolver == nil {
		cfg.Resolver = net.DefaultResolver
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	return cfg
}

// listenMultiaddr accepts a multiaddr or host:port.
func listenMultiaddr(s string) (ma.Multiaddr, error) {
	if strings.HasPrefix(s, "/") {
		m, err := ma.NewMultiaddr(s)
		if err != nil {
			return nil, fmt.Errorf("listen address %q: %w", s, err)
		}
		return m, nil
	}
	host, port, err := net.SplitHostPort(s)
	if err != nil {
		return nil, fmt.Errorf("listen address %q: %w", s, err)
	}
	if host == "" {
		host = "0.0.0.0"
	}
	ip := net.ParseIP(host)
	if ip == nil {
		return nil, fmt.Errorf("listen address %q: host must be an IP address", s)
	}
	proto := "ip4"
	if ip.To4() == nil {
		proto = "ip6"
	}
	m, err := ma.NewMultiaddr(fmt.Sprintf("/%s/%s/tcp/%s", proto, ip, port))
	if err != nil {
		return nil, fmt.Errorf("listen address %q: %w", s, err)
	}
	return m, nil
}

// Close stops the background loops, the DHT and the libp2p host. Records
// this node put on other nodes expire there within ProviderTTL.
func (r *Router) Close() error {
	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		return nil
	}
	r.closed = true
	r.mu.Unlock()
	r.cancel()
	r.wg.Wait()
	var errs []error
	if err := r.prov.Close(); err != nil {
		errs = append(errs, fmt.Errorf("close provider: %w", err))
	}
	if err := r.topic.Close(); err != nil && !errors.Is(err, context.Canceled) {
		r.log.Debug("close announcement topic", "error", err)
	}
	if err := r.dht.Close(); err != nil {
		errs = append(errs, fmt.Errorf("close kad-dht: %w", err))
	}
	if err := r.host.Close(); err != nil {
		errs = append(errs, fmt.Errorf("close libp2p host: %w", err))
	}
	return errors.Join(errs...)
}

// ID returns this node's libp2p peer ID.
func (r *Router) ID() string { return r.host.ID().String() }

// Peer returns the peer with ID id as a relay target, dialling it when this
// node is not connected to it. The cache tier names peers by ID when it
// sends a node to others receiving a blob, with the addresses they gave it:
// multiaddrs ending in /p2p/<id>. With them, the peer is dialled there
// directly, within ctx (not the shorter DialTimeout, and past a dial
// backoff: the cache tier has just heard from it), and no DHT lookup is
// made. A hint for another peer is ignored, and a wrong one only fails to
// dial: the connection's handshake proves the peer's ID.
func (r *Router) Peer(ctx context.Context, id string, addrs []string) (routing.Peer, error) {
	pid, err := peer.Decode(id)
	if err != nil {
		return routing.Peer{}, fmt.Errorf("peer %q: %w", id, err)
	}
	if pid == r.host.ID() {
		return routing.Peer{}, errors.New("peer is this node")
	}
	var hints []ma.Multiaddr
	for _, a := range addrs {
		m, err := ma.NewMultiaddr(a)
		if err != nil {
			continue
		}
		if info, err := peer.AddrInfoFromP2pAddr(m); err == nil && info.ID == pid {
			hints = append(hints, info.Addrs...)
		}
	}
	if len(hints) == 0 {
		if r.live.isDead(pid) {
			return routing.Peer{}, fmt.Errorf("peer %s was unreachable moments ago", pid)
		}
		return r.reachable(ctx, pid)
	}
	if r.host.Network().Connectedness(pid) != network.Connected {
		dctx := network.WithForceDirectDial(ctx, "herd receiver named by the cache tier")
		if dl, ok := ctx.Deadline(); ok {
			dctx = network.WithDialPeerTimeout(dctx, time.Until(dl))
		}
		if err := r.host.Connect(dctx, peer.AddrInfo{ID: pid, Addrs: hints}); err != nil {
			return routing.Peer{}, fmt.Errorf("dial receiver: %w", err)
		}
		r.live.markAlive(pid)
	}
	return r.reachable(ctx, pid)
}

// DialAddrs returns the multiaddrs other nodes can dial this node at,
// without /p2p/<ID>: its listen addresses, loopback ones left out unless
// there are no others.
func (r *Router) DialAddrs() []string {
	var all, out []string
	for _, a := range r.host.Addrs() {
		all = append(all, a.String())
		if !manet.IsIPLoopback(a) {
			out = append(out, a.String())
		}
	}
	if len(out) == 0 {
		return all
	}
	return out
}

// Addrs returns the multiaddrs this node listens on, each ending in
// /p2p/<ID>, usable as another node's BootstrapPeers entry.
func (r *Router) Addrs() []string {
	var out []string
	for _, a := range r.host.Addrs() {
		out = append(out, a.Encapsulate(ma.StringCast("/p2p/"+r.host.ID().String())).String())
	}
	return out
}

// Ready reports whether the router can take part in the DHT: at least one
// peer in its routing table, or no bootstrap peers configured (a single
// node, or the first one).
func (r *Router) Ready() bool {
	return len(r.cfg.BootstrapPeers) == 0 || r.dht.RoutingTable().Size() > 0
}

// keyCID maps a key to the CID it is provided under: CIDv1, raw codec,
// sha256 multihash of the key string.
func keyCID(key string) (cid.Cid, error) {
	h := wire.HashKey(key)
	return hashCID(h)
}

func hashCID(h keyHash) (cid.Cid, error) {
	m, err := mh.Encode(h[:], mh.SHA2_256)
	if err != nil {
		return cid.Undef, fmt.Errorf("multihash: %w", err)
	}
	return cid.NewCidV1(cid.Raw, m), nil
}

// Advertise announces that this node holds keys: at once to every node
// listening for announcements, and through the DHT, where the sweeping
// provider keeps the records alive until the keys are withdrawn. It does
// not wait for the DHT: a node with no peers yet provides its keys once it
// finds some.
func (r *Router) Advertise(ctx context.Context, keys []string) error {
	hashes, mhs, err := r.hashes(keys)
	if err != nil {
		return fmt.Errorf("advertise: %w", err)
	}
	r.mu.Lock()
	for _, h := range hashes {
		r.keys[h] = struct{}{}
	}
	r.metrics.advertisedKeys.Set(float64(len(r.keys)))
	r.mu.Unlock()
	// This node's own record, so a query that reaches it finds it even
	// before the provider has swept (or while it is offline).
	self := peer.AddrInfo{ID: r.host.ID()}
	for _, m := range mhs {
		if err := r.dht.ProviderStore().AddProvider(ctx, m, self); err != nil {
			return fmt.Errorf("advertise: local record: %w", err)
		}
	}
	if err := r.prov.StartProviding(false, mhs...); err != nil {
		r.metrics.provideErrors.Inc()
		return fmt.Errorf("advertise: %w", err)
	}
	r.announce(ctx, wire.OpAdd, hashes)
	return nil
}

// Withdraw stops announcing keys. Every node listening for announcements
// forgets them at once; the DHT records (this node's own included, which
// kad-dht offers no way to delete) are no longer re-provided and expire
// within ProviderTTL.
func (r *Router) Withdraw(ctx context.Context, keys []string) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	hashes, mhs, err := r.hashes(keys)
	if err != nil {
		return fmt.Errorf("withdraw: %w", err)
	}
	r.mu.Lock()
	for _, h := range hashes {
		delete(r.keys, h)
	}
	r.metrics.advertisedKeys.Set(float64(len(r.keys)))
	r.mu.Unlock()
	if err := r.prov.StopProviding(mhs...); err != nil {
		return fmt.Errorf("withdraw: %w", err)
	}
	r.announce(ctx, wire.OpRemove, hashes)
	return nil
}

// Forget tells the router that peerID was asked for key and does not hold
// it (a stale record): lookups leave that peer out for key until its DHT
// record would have expired.
func (r *Router) Forget(key, peerID string) {
	id, err := peer.Decode(peerID)
	if err != nil {
		return
	}
	r.cache.forget(id, r.cfg.ProviderTTL, wire.HashKey(key))
	r.metrics.cachedKeys.Set(float64(r.cache.Len()))
}

func (r *Router) hashes(keys []string) ([]keyHash, []mh.Multihash, error) {
	hashes := make([]keyHash, len(keys))
	mhs := make([]mh.Multihash, len(keys))
	for i, k := range keys {
		hashes[i] = wire.HashKey(k)
		m, err := mh.Encode(hashes[i][:], mh.SHA2_256)
		if err != nil {
			return nil, nil, fmt.Errorf("key %q: %w", k, err)
		}
		mhs[i] = m
	}
	return hashes, mhs, nil
}

// maintainLoop releases the announcements held back at start (see
// announce), keeps the peers gauge current, and probes dead peers every
// deadPeerProbeInterval in the background (so no request pays for it). A
// peer dead for deadPeerForgetAfter is dropped from the cache.
func (r *Router) maintainLoop() {
	defer r.wg.Done()
	gauge := time.NewTicker(5 * time.Second)
	defer gauge.Stop()
	probe := time.NewTicker(deadPeerProbeInterval)
	defer probe.Stop()
	start := time.NewTicker(250 * time.Millisecond)
	defer start.Stop()
	startC := start.C // until the held-back announcements are out
	for {
		select {
		case <-r.ctx.Done():
			return
		case now := <-startC:
			if r.releasePending(r.ctx, now) {
				start.Stop()
				startC = nil
			}
		case <-gauge.C:
			r.metrics.peers.Set(float64(r.dht.RoutingTable().Size()))
		case <-probe.C:
			r.probeDead()
		}
	}
}

// probeSoon dials id in the background (once at a time per peer) and marks
// it dead if that fails.
func (r *Router) probeSoon(id peer.ID) {
	r.dialSoon(id, func(ctx context.Context) error {
		return r.host.Connect(ctx, peer.AddrInfo{ID: id})
	}, true)
}

// connectSoon connects to id in the background if this node is not
// connected to it yet (finding its addresses in the DHT if need be), so
// that the first request for what id announced does not pay for the dial.
func (r *Router) connectSoon(id peer.ID) {
	if r.host.Network().Connectedness(id) == network.Connected || r.live.isDead(id) {
		return
	}
	r.dialSoon(id, func(ctx context.Context) error { return r.connect(ctx, id) }, false)
}

// dialSoon runs dial for id in the background, one at a time per peer,
// within DialTimeout; with markDead, a failure marks id dead.
func (r *Router) dialSoon(id peer.ID, dial func(context.Context) error, markDead bool) {
	if !r.claim(r.probing, id) {
		return
	}
	go func() {
		defer r.wg.Done()
		defer r.unclaim(r.probing, id)
		ctx, cancel := context.WithTimeout(r.ctx, r.cfg.DialTimeout)
		defer cancel()
		if err := dial(ctx); err != nil && markDead && r.ctx.Err() == nil {
			r.live.markDead(id)
			r.log.Debug("peer gone", "peer", id, "error", err)
		}
	}()
}

// claim marks id in set, one of the router's per-peer job sets, and counts
// the job in wg, which the job's goroutine must mark done. It returns false,
// and does neither, while the router closes or when id is already marked.
func (r *Router) claim(set map[peer.ID]bool, id peer.ID) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed || set[id] {
		return false
	}
	set[id] = true
	r.wg.Add(1)
	return true
}

// unclaim clears id's mark in set.
func (r *Router) unclaim(set map[peer.ID]bool, id peer.ID) {
	r.mu.Lock()
	delete(set, id)
	r.mu.Unlock()
}

func (r *Router) probeDead() {
	for id, since := range r.live.snapshot() {
		if time.Since(since) > deadPeerForgetAfter {
			r.cache.dropPeer(id)
			r.live.markAlive(id)           // forgotten; a new record makes it a candidate again
			r.unclaim(r.holdingsAsked, id) // if it comes back, ask it again
			continue
		}
		ctx, cancel := context.WithTimeout(r.ctx, r.cfg.DialTimeout)
		err := r.host.Connect(ctx, peer.AddrInfo{ID: id})
		cancel()
		if err == nil {
			r.live.markAlive(id)
		}
	}
	r.metrics.cachedKeys.Set(float64(r.cache.Len()))
}

// bootstrapLoop dials the bootstrap peers at start and every
// BootstrapInterval.
func (r *Router) bootstrapLoop() {
	defer r.wg.Done()
	if len(r.cfg.BootstrapPeers) == 0 {
		return
	}
	t := time.NewTicker(r.cfg.BootstrapInterval)
	defer t.Stop()
	for {
		r.bootstrapRound(r.ctx)
		r.metrics.peers.Set(float64(r.dht.RoutingTable().Size()))
		select {
		case <-r.ctx.Done():
			return
		case <-t.C:
		}
	}
}

// Lookup returns up to max peers other than this node that hold key and
// that this node is connected to or can dial within DialTimeout, with Addr
// and Zone filled from their identify UserAgent. Known holders (from
// announcements and earlier lookups) are answered from the cache; otherwise
// it queries the DHT and returns as soon as a provider is reachable, while
// the query goes on in the background to fill the cache. Peers found dead
// are skipped. An unknown key yields an empty result and no error.
func (r *Router) Lookup(ctx context.Context, key string, max int) ([]routing.Peer, error) {
	if max <= 0 {
		return nil, nil
	}
	start := time.Now()
	defer func() { r.metrics.lookupDuration.Observe(time.Since(start).Seconds()) }()
	h := wire.HashKey(key)
	if out := r.reachableAll(ctx, r.cache.get(h), max); len(out) > 0 {
		r.metrics.lookups.WithLabelValues("cache").Inc()
		return out, nil
	}
	c, err := hashCID(h)
	if err != nil {
		return nil, fmt.Errorf("lookup: %w", err)
	}
	found := make(chan routing.Peer, 1)
	go r.query(h, c, key, found)
	var out []routing.Peer
	select {
	case p, ok := <-found:
		if ok {
			out = append(out, p)
		}
	case <-ctx.Done():
	}
	if len(out) == 0 {
		r.metrics.lookups.WithLabelValues("miss").Inc()
		if ctx.Err() != nil {
			return nil, fmt.Errorf("lookup: %w", ctx.Err())
		}
		return nil, nil
	}
	r.metrics.lookups.WithLabelValues("dht").Inc()
	return out, nil
}

// query runs one DHT provider query to its end (bounded by LookupTimeout),
// adds every reachable provider to the cache, and sends the first one on
// first, then closes it.
func (r *Router) query(h keyHash, c cid.Cid, key string, first chan<- routing.Peer) {
	ctx, cancel := context.WithTimeout(r.ctx, r.cfg.LookupTimeout)
	defer cancel()
	var (
		wg   sync.WaitGroup
		once sync.Once
	)
	self := r.host.ID()
	seen := map[peer.ID]bool{self: true}
	for info := range r.dht.FindProvidersAsync(ctx, c, 0) {
		if seen[info.ID] || r.live.isDead(info.ID) {
			continue
		}
		seen[info.ID] = true
		if len(info.Addrs) > 0 {
			r.host.Peerstore().AddAddrs(info.ID, info.Addrs, time.Hour)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			p, err := r.reachable(ctx, info.ID)
			if err != nil {
				r.log.Debug("skipping provider", "key", key, "peer", info.ID, "error", err)
				return
			}
			if r.cache.add(info.ID, true, h) == 0 {
				return // it withdrew the key, or was found not to hold it
			}
			once.Do(func() { first <- p })
		}()
	}
	wg.Wait()
	once.Do(func() {})
	close(first)
	r.metrics.cachedKeys.Set(float64(r.cache.Len()))
}

// reachableAll returns up to max of ids as Peers, in order, leaving out
// this node, dead peers and peers that cannot be reached now. Peers that
// need a dial are dialled in parallel.
func (r *Router) reachableAll(ctx context.Context, ids []peer.ID, max int) []routing.Peer {
	self := r.host.ID()
	res := make([]*routing.Peer, len(ids))
	var wg sync.WaitGroup
	for i, id := range ids {
		if id == self || r.live.isDead(id) {
			continue
		}
		if r.host.Network().Connectedness(id) == network.Connected {
			if p, err := r.reachable(ctx, id); err == nil {
				res[i] = &p
			}
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			if p, err := r.reachable(ctx, id); err == nil {
				res[i] = &p
			}
		}()
	}
	wg.Wait()
	var out []routing.Peer
	for _, p := range res {
		if p != nil && len(out) < max {
			out = append(out, *p)
		}
	}
	return out
}

// reachable makes sure this node is connected to the provider (dialling it
// within DialTimeout if needed) and builds its Peer from identify data.
func (r *Router) reachable(ctx context.Context, id peer.ID) (routing.Peer, error) {
	nw := r.host.Network()
	if nw.Connectedness(id) != network.Connected {
		dctx, cancel := context.WithTimeout(ctx, r.cfg.DialTimeout)
		err := r.connect(dctx, id) // waits for identify
		cancel()
		if err != nil {
			if ctx.Err() == nil {
				r.live.markDead(id)
			}
			return routing.Peer{}, fmt.Errorf("dial provider: %w", err)
		}
	}
	info := peer.AddrInfo{ID: id}
	conns := nw.ConnsToPeer(info.ID)
	if len(conns) == 0 {
		return routing.Peer{}, errors.New("no connection to provider")
	}
	ua, err := r.agentOf(ctx, info.ID, conns[0])
	if err != nil {
		return routing.Peer{}, err
	}
	registry, zone, ok := parseAgent(ua)
	if !ok {
		return routing.Peer{}, fmt.Errorf("not a shoal peer (agent %q)", ua)
	}
	ip, _ := manet.ToIP(conns[0].RemoteMultiaddr())
	addr, err := registryURL(registry, ip)
	if err != nil {
		return routing.Peer{}, err
	}
	return routing.Peer{ID: info.ID.String(), Addr: addr, Zone: zone}, nil
}

// connect dials id at the addresses in the peerstore, or, when there are
// none (a peer known only from an announcement), at the addresses the DHT
// finds for it.
func (r *Router) connect(ctx context.Context, id peer.ID) error {
	info := peer.AddrInfo{ID: id, Addrs: r.host.Peerstore().Addrs(id)}
	if len(info.Addrs) == 0 {
		found, err := r.dht.FindPeer(ctx, id)
		if err != nil {
			return fmt.Errorf("find peer addresses: %w", err)
		}
		info = found
	}
	return r.host.Connect(ctx, info)
}

// agentOf returns the peer's identify UserAgent, waiting for identify to
// finish on conn when it has not yet.
func (r *Router) agentOf(ctx context.Context, id peer.ID, conn network.Conn) (string, error) {
	get := func() (string, bool) {
		v, err := r.host.Peerstore().Get(id, "AgentVersion")
		if err != nil {
			return "", false
		}
		s, ok := v.(string)
		return s, ok
	}
	if ua, ok := get(); ok {
		return ua, nil
	}
	if ids, ok := r.host.(interface{ IDService() identify.IDService }); ok {
		wctx, cancel := context.WithTimeout(ctx, r.cfg.DialTimeout)
		defer cancel()
		select {
		case <-ids.IDService().IdentifyWait(conn):
		case <-wctx.Done():
			return "", fmt.Errorf("identify provider: %w", wctx.Err())
		}
		if ua, ok := get(); ok {
			return ua, nil
		}
	}
	return "", errors.New("provider sent no user agent")
}
