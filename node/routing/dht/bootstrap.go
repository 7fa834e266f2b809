package dht

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"
	"sync"

	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/peerstore"
	"github.com/libp2p/go-libp2p/core/sec"
	ma "github.com/multiformats/go-multiaddr"
)

// Bootstrap entries come in four forms:
//
//   - a multiaddr with a peer ID: /ip4/10.0.0.7/tcp/5001/p2p/12D3KooW...
//   - a multiaddr without one:    /ip4/10.0.0.7/tcp/5001 or /dns4/name/tcp/5001
//   - host:port with an IP:       10.0.0.7:5001
//   - host:port with a DNS name:  shoal-node.shoal.svc:5001 (for example a
//     Kubernetes headless Service, one A record per node)
//
// Names are resolved again on every round (Config.BootstrapInterval), so
// nodes that appear later are found. When an address carries no peer ID the
// ID is learnt the libp2p-native way: the router dials the address while
// claiming to expect a throw-away peer ID; the security handshake (noise or
// TLS) then fails with sec.ErrPeerIDMismatch, which carries the remote's
// real ID. The half-open connection is discarded and the real ID dialled.
// With a PSK the handshake only gets that far when both sides share the key.

// target is one address to connect to; id is empty when unknown.
type target struct {
	id   peer.ID
	addr ma.Multiaddr
}

// validateEntry checks the syntax of a BootstrapPeers entry without
// resolving it.
func validateEntry(entry string) error {
	if strings.HasPrefix(entry, "/") {
		m, err := ma.NewMultiaddr(entry)
		if err != nil {
			return fmt.Errorf("bootstrap peer %q: %w", entry, err)
		}
		if transport, _ := peer.SplitAddr(m); transport == nil {
			return fmt.Errorf("bootstrap peer %q has no address", entry)
		}
		return nil
	}
	host, port, err := net.SplitHostPort(entry)
	if err != nil {
		return fmt.Errorf("bootstrap peer %q: %w", entry, err)
	}
	if host == "" {
		return fmt.Errorf("bootstrap peer %q has no host", entry)
	}
	if _, err := strconv.ParseUint(port, 10, 16); err != nil {
		return fmt.Errorf("bootstrap peer %q: bad port: %w", entry, err)
	}
	return nil
}

// resolveEntry turns one BootstrapPeers entry into dial targets.
func (r *Router) resolveEntry(ctx context.Context, entry string) ([]target, error) {
	if strings.HasPrefix(entry, "/") {
		m, err := ma.NewMultiaddr(entry)
		if err != nil {
			return nil, fmt.Errorf("bootstrap peer %q: %w", entry, err)
		}
		transport, id := peer.SplitAddr(m)
		if transport == nil {
			return nil, fmt.Errorf("bootstrap peer %q has no address", entry)
		}
		if host, port, ok := dnsHostPort(transport); ok && id == "" {
			return r.resolveHostPort(ctx, net.JoinHostPort(host, port))
		}
		return []target{{id: id, addr: transport}}, nil
	}
	return r.resolveHostPort(ctx, entry)
}

// dnsHostPort splits /dns{,4,6}/<name>/tcp/<port> into name and port.
func dnsHostPort(m ma.Multiaddr) (host, port string, ok bool) {
	if len(m) != 2 {
		return "", "", false
	}
	switch m[0].Protocol().Code {
	case ma.P_DNS, ma.P_DNS4, ma.P_DNS6:
	default:
		return "", "", false
	}
	if m[1].Protocol().Code != ma.P_TCP {
		return "", "", false
	}
	return m[0].Value(), m[1].Value(), true
}

// resolveHostPort resolves host:port to one target per IP address.
func (r *Router) resolveHostPort(ctx context.Context, hostPort string) ([]target, error) {
	host, port, err := net.SplitHostPort(hostPort)
	if err != nil {
		return nil, fmt.Errorf("bootstrap peer %q: %w", hostPort, err)
	}
	if _, err := strconv.ParseUint(port, 10, 16); err != nil {
		return nil, fmt.Errorf("bootstrap peer %q: bad port: %w", hostPort, err)
	}
	var ips []net.IP
	if ip := net.ParseIP(host); ip != nil {
		ips = []net.IP{ip}
	} else {
		addrs, err := r.resolver.LookupIPAddr(ctx, host)
		if err != nil {
			return nil, fmt.Errorf("resolve bootstrap peer %q: %w", hostPort, err)
		}
		for _, a := range addrs {
			ips = append(ips, a.IP)
		}
	}
	out := make([]target, 0, len(ips))
	for _, ip := range ips {
		proto := "ip4"
		if ip.To4() == nil {
			proto = "ip6"
		}
		m, err := ma.NewMultiaddr(fmt.Sprintf("/%s/%s/tcp/%s", proto, ip, port))
		if err != nil {
			return nil, fmt.Errorf("bootstrap peer %q: %w", hostPort, err)
		}
		out = append(out, target{addr: m})
	}
	return out, nil
}

// bootstrapRound resolves every entry and connects to the targets this node
// is not connected to yet, a few at a time.
func (r *Router) bootstrapRound(ctx context.Context) {
	var targets []target
	for _, entry := range r.cfg.BootstrapPeers {
		ts, err := r.resolveEntry(ctx, entry)
		if err != nil {
			r.log.Warn("bootstrap peer unusable", "entry", entry, "error", err)
			continue
		}
		targets = append(targets, ts...)
	}
	sem := make(chan struct{}, 8)
	var wg sync.WaitGroup
	for _, t := range targets {
		if r.connectedTo(t) {
			continue
		}
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			if err := r.connectTarget(ctx, t); err != nil {
				r.log.Debug("bootstrap dial failed", "addr", t.addr, "error", err)
			}
		}()
	}
	wg.Wait()
}

// connectedTo reports whether this node already has a connection to t's
// peer: by ID when known, otherwise to a peer known to listen on t.addr.
func (r *Router) connectedTo(t target) bool {
	nw := r.host.Network()
	if t.id != "" {
		return nw.Connectedness(t.id) == network.Connected
	}
	for _, p := range nw.Peers() {
		for _, a := range r.host.Peerstore().Addrs(p) {
			if a.Equal(t.addr) {
				return true
			}
		}
		for _, c := range nw.ConnsToPeer(p) {
			if c.RemoteMultiaddr().Equal(t.addr) {
				return true
			}
		}
	}
	return false
}

// connectTarget connects to t, learning its peer ID first when unknown.
func (r *Router) connectTarget(ctx context.Context, t target) error {
	id := t.id
	if id == "" {
		var err error
		if id, err = r.discoverID(ctx, t.addr); err != nil {
			return err
		}
	}
	if id == r.host.ID() {
		return nil // a DNS name that includes this node
	}
	dctx, cancel := context.WithTimeout(ctx, r.cfg.DialTimeout)
	defer cancel()
	info := peer.AddrInfo{ID: id, Addrs: []ma.Multiaddr{t.addr}}
	if err := r.host.Connect(dctx, info); err != nil {
		return fmt.Errorf("connect to bootstrap peer %s: %w", info, err)
	}
	r.host.Peerstore().AddAddrs(id, info.Addrs, peerstore.RecentlyConnectedAddrTTL)
	r.mu.Lock()
	r.bootstrapped[id] = info
	r.mu.Unlock()
	r.log.Debug("connected to bootstrap peer", "peer", id, "addr", t.addr)
	return nil
}

// discoverID learns the peer ID of whoever listens on addr; see the comment
// at the top of this file.
func (r *Router) discoverID(ctx context.Context, addr ma.Multiaddr) (peer.ID, error) {
	sk, _, err := crypto.GenerateEd25519Key(rand.Reader)
	if err != nil {
		return "", fmt.Errorf("probe identity: %w", err)
	}
	probe, err := peer.IDFromPrivateKey(sk)
	if err != nil {
		return "", fmt.Errorf("probe identity: %w", err)
	}
	ps := r.host.Peerstore()
	ps.AddAddr(probe, addr, peerstore.TempAddrTTL)
	defer ps.RemovePeer(probe)
	defer ps.ClearAddrs(probe)

	dctx, cancel := context.WithTimeout(ctx, r.cfg.DialTimeout)
	defer cancel()
	conn, err := r.host.Network().DialPeer(dctx, probe)
	if err == nil {
		conn.Close()
		return "", fmt.Errorf("learn peer ID at %s: the handshake accepted a throw-away ID", addr)
	}
	var mismatch sec.ErrPeerIDMismatch
	if errors.As(err, &mismatch) && mismatch.Actual != "" {
		return mismatch.Actual, nil
	}
	return "", fmt.Errorf("learn peer ID at %s: %w", addr, err)
}

// bootstrapPeers is what kad-dht falls back on when its routing table runs
// empty: the bootstrap peers this router has reached before.
func (r *Router) bootstrapPeers() []peer.AddrInfo {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := make([]peer.AddrInfo, 0, len(r.bootstrapped))
	for _, info := range r.bootstrapped {
		out = append(out, info)
	}
	return out
}
