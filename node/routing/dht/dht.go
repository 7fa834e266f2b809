// Package dht is the node tier's Router on a libp2p Kademlia DHT (kad-dht in
// server mode, protocol prefix "/shoal", TCP only).
//
// Keys (digests "sha256:..." and tag references) become CIDv1 with the raw
// codec over the sha256 multihash of the key string. Advertise provides a
// key; a background loop re-provides every advertised key every
// ProviderTTL/2. Every node stores provider records for ProviderTTL only
// (kad-dht's provider manager option records.ProvideValidity; kad-dht's own
// default is 48h), so a withdrawn key or a dead node drops out of every
// lookup within one TTL. Lookup also only returns providers it is connected
// to or can dial within DialTimeout, so a node that just died is skipped at
// once.
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
	"github.com/libp2p/go-libp2p-kad-dht/records"
	kb "github.com/libp2p/go-libp2p-kbucket"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/pnet"
	"github.com/libp2p/go-libp2p/p2p/protocol/identify"
	"github.com/libp2p/go-libp2p/p2p/transport/tcp"
	ma "github.com/multiformats/go-multiaddr"
	manet "github.com/multiformats/go-multiaddr/net"
	mh "github.com/multiformats/go-multihash"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/shoal-oci/shoal/node/routing"
)

// Defaults for the zero values of Config.
const (
	DefaultListenAddr         = "0.0.0.0:5001"
	DefaultProviderTTL        = time.Minute
	DefaultBootstrapInterval  = 30 * time.Second
	DefaultDialTimeout        = 2 * time.Second
	DefaultLookupTimeout      = 5 * time.Second
	DefaultLookupGrace        = 20 * time.Millisecond
	DefaultProvideConcurrency = 8
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
	// re-provided every ProviderTTL/2. Default DefaultProviderTTL.
	ProviderTTL time.Duration
	// DialTimeout bounds one dial: of a bootstrap peer, or of a provider
	// during Lookup. Default DefaultDialTimeout.
	DialTimeout time.Duration
	// LookupTimeout bounds one Lookup. Default DefaultLookupTimeout.
	LookupTimeout time.Duration
	// LookupGrace is how long Lookup keeps collecting providers after the
	// first one. Default DefaultLookupGrace.
	LookupGrace time.Duration
	// ProvideConcurrency is how many keys are provided at once. Default
	// DefaultProvideConcurrency.
	ProvideConcurrency int
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
	metrics  *metrics
	resolver *net.Resolver

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
	kick   chan struct{} // asks the provide loop for a round now

	mu           sync.Mutex
	keys         map[string]cid.Cid // advertised keys
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
		libp2p.Transport(tcp.NewTCPTransport),
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
		cfg:          cfg,
		log:          cfg.Logger,
		host:         h,
		metrics:      m,
		resolver:     cfg.Resolver,
		ctx:          rctx,
		cancel:       cancel,
		kick:         make(chan struct{}, 1),
		keys:         make(map[string]cid.Cid),
		bootstrapped: make(map[peer.ID]peer.AddrInfo),
	}
	r.dht, err = kad.New(h,
		kad.Mode(kad.ModeServer),
		kad.ProtocolPrefix("/shoal"),
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
	r.log.Info("dht started", "peer", h.ID(), "addrs", r.Addrs(), "zone", cfg.Zone, "provider_ttl", cfg.ProviderTTL)

	r.wg.Add(2)
	go r.bootstrapLoop()
	go r.provideLoop()
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
	if cfg.LookupGrace <= 0 {
		cfg.LookupGrace = DefaultLookupGrace
	}
	if cfg.ProvideConcurrency <= 0 {
		cfg.ProvideConcurrency = DefaultProvideConcurrency
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
	sum, err := mh.Sum([]byte(key), mh.SHA2_256, -1)
	if err != nil {
		return cid.Undef, fmt.Errorf("hash key %q: %w", key, err)
	}
	return cid.NewCidV1(cid.Raw, sum), nil
}

// Advertise announces that this node holds keys. The keys are re-provided
// every ProviderTTL/2 until withdrawn. A node with no peers yet reports no
// error: its keys go out once peers are found. Other provide failures are
// returned (the keys stay advertised and are retried).
func (r *Router) Advertise(ctx context.Context, keys []string) error {
	cids := make([]cid.Cid, 0, len(keys))
	for _, k := range keys {
		c, err := keyCID(k)
		if err != nil {
			return fmt.Errorf("advertise: %w", err)
		}
		cids = append(cids, c)
	}
	r.mu.Lock()
	for i, k := range keys {
		r.keys[k] = cids[i]
	}
	r.metrics.advertisedKeys.Set(float64(len(r.keys)))
	r.mu.Unlock()
	if err := r.provide(ctx, cids); err != nil {
		return fmt.Errorf("advertise: %w", err)
	}
	return nil
}

// Withdraw stops announcing keys: they are no longer re-provided, so the
// records on other nodes (and this node's own record, which kad-dht offers
// no way to delete) expire within ProviderTTL.
func (r *Router) Withdraw(ctx context.Context, keys []string) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, k := range keys {
		delete(r.keys, k)
	}
	r.metrics.advertisedKeys.Set(float64(len(r.keys)))
	return nil
}

// provide announces cids, ProvideConcurrency at a time.
func (r *Router) provide(ctx context.Context, cids []cid.Cid) error {
	timeout := min(max(r.cfg.ProviderTTL/2, time.Second), 30*time.Second)
	sem := make(chan struct{}, r.cfg.ProvideConcurrency)
	var (
		wg   sync.WaitGroup
		mu   sync.Mutex
		errs []error
	)
	for _, c := range cids {
		select {
		case sem <- struct{}{}:
		case <-ctx.Done():
			wg.Wait()
			return ctx.Err()
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			pctx, cancel := context.WithTimeout(ctx, timeout)
			defer cancel()
			err := r.dht.Provide(pctx, c, true)
			if err == nil || errors.Is(err, kb.ErrLookupFailure) {
				return // no peers yet: the record is stored locally
			}
			r.metrics.provideErrors.Inc()
			mu.Lock()
			errs = append(errs, fmt.Errorf("provide %s: %w", c, err))
			mu.Unlock()
		}()
	}
	wg.Wait()
	return errors.Join(errs...)
}

// provideLoop re-provides every advertised key every ProviderTTL/2, and at
// once when the routing table goes from empty to non-empty. It also keeps
// the peers gauge current.
func (r *Router) provideLoop() {
	defer r.wg.Done()
	reprovide := time.NewTicker(r.cfg.ProviderTTL / 2)
	defer reprovide.Stop()
	watch := time.NewTicker(time.Second)
	defer watch.Stop()
	lastSize := 0
	for {
		select {
		case <-r.ctx.Done():
			return
		case <-watch.C:
			size := r.dht.RoutingTable().Size()
			r.metrics.peers.Set(float64(size))
			if lastSize == 0 && size > 0 {
				r.requestProvide()
			}
			lastSize = size
			continue
		case <-reprovide.C:
		case <-r.kick:
		}
		r.mu.Lock()
		cids := make([]cid.Cid, 0, len(r.keys))
		for _, c := range r.keys {
			cids = append(cids, c)
		}
		r.mu.Unlock()
		if err := r.provide(r.ctx, cids); err != nil && r.ctx.Err() == nil {
			r.log.Warn("reprovide failed for some keys", "keys", len(cids), "error", err)
		}
	}
}

func (r *Router) requestProvide() {
	select {
	case r.kick <- struct{}{}:
	default:
	}
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

// Lookup returns up to max peers other than this node that advertise key and
// that this node is connected to or can dial within DialTimeout, with Addr
// and Zone filled from their identify UserAgent. An unknown key yields an
// empty result and no error.
func (r *Router) Lookup(ctx context.Context, key string, max int) ([]routing.Peer, error) {
	if max <= 0 {
		return nil, nil
	}
	c, err := keyCID(key)
	if err != nil {
		return nil, fmt.Errorf("lookup: %w", err)
	}
	start := time.Now()
	defer func() { r.metrics.lookupDuration.Observe(time.Since(start).Seconds()) }()

	lctx, cancel := context.WithTimeout(ctx, r.cfg.LookupTimeout)
	defer cancel()
	// Ask for more than max: this node and unreachable providers are
	// dropped below.
	provs := r.dht.FindProvidersAsync(lctx, c, 2*max+1)

	found := make(chan routing.Peer)
	go func() {
		var wg sync.WaitGroup
		seen := map[peer.ID]bool{r.host.ID(): true}
		for info := range provs {
			if seen[info.ID] {
				continue
			}
			seen[info.ID] = true
			wg.Add(1)
			go func() {
				defer wg.Done()
				p, err := r.reachable(lctx, info)
				if err != nil {
					r.log.Debug("skipping provider", "key", key, "peer", info.ID, "error", err)
					return
				}
				select {
				case found <- p:
				case <-lctx.Done():
				}
			}()
		}
		wg.Wait()
		close(found)
	}()

	// Once one provider is in hand, wait only a short grace for more: the
	// rest of a DHT query costs round trips that a pull should not wait for.
	var out []routing.Peer
	var grace <-chan time.Time
collect:
	for {
		select {
		case p, ok := <-found:
			if !ok {
				break collect
			}
			out = append(out, p)
			if len(out) == max {
				break collect
			}
			if grace == nil {
				t := time.NewTimer(r.cfg.LookupGrace)
				defer t.Stop()
				grace = t.C
			}
		case <-grace:
			break collect
		}
	}
	cancel()
	for range found { // let the workers finish
	}
	if len(out) == 0 && ctx.Err() != nil {
		return nil, fmt.Errorf("lookup: %w", ctx.Err())
	}
	return out, nil
}

// reachable makes sure this node is connected to the provider (dialling it
// within DialTimeout if needed) and builds its Peer from identify data.
func (r *Router) reachable(ctx context.Context, info peer.AddrInfo) (routing.Peer, error) {
	nw := r.host.Network()
	if nw.Connectedness(info.ID) != network.Connected {
		dctx, cancel := context.WithTimeout(ctx, r.cfg.DialTimeout)
		err := r.host.Connect(dctx, info) // waits for identify
		cancel()
		if err != nil {
			return routing.Peer{}, fmt.Errorf("dial provider: %w", err)
		}
	}
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
