// Package node is the per-node registry mirror: an HTTP handler that serves
// the distribution API's pull side from the node's own containerd, then from
// peers found through the DHT, then from the cache tier.
package node

import (
	"context"
	"io"
	"log/slog"
	"net/http"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/shoal-oci/shoal/auth"
	"github.com/shoal-oci/shoal/node/routing"
	"github.com/shoal-oci/shoal/node/store"
)

// Store is where local content comes from. Implementations live in
// node/store; they return errors wrapping store.ErrNotFound for unknown keys.
type Store interface {
	// Resolve maps a tag reference ("docker.io/library/alpine:3.20") to a manifest digest.
	Resolve(ctx context.Context, ref string) (digest.Digest, error)
	// Stat describes content. MediaType is set for manifests.
	Stat(ctx context.Context, dgst digest.Digest) (ocispec.Descriptor, error)
	// Open returns the content; an *os.File where possible so the kernel can sendfile.
	Open(ctx context.Context, dgst digest.Digest) (io.ReadSeekCloser, error)
	// Watch sends a Snapshot of every key, then changes, until ctx is done.
	Watch(ctx context.Context, ch chan<- store.Event) error
}

// Router finds the peers that hold a key and announces this node's keys.
type Router interface {
	Advertise(ctx context.Context, keys []string) error
	Withdraw(ctx context.Context, keys []string) error
	Lookup(ctx context.Context, key string, max int) ([]routing.Peer, error)
}

// forgetter is what a Router may also do: be told that a peer it returned
// does not hold a key after all (a stale record), so the next lookup leaves
// it out. The DHT router implements it.
type forgetter interface {
	Forget(key, peerID string)
}

// PeerHeader marks a request from another node. A node answers such a request
// from its local store only, so requests between peers cannot loop.
const PeerHeader = "X-Shoal-Peer"

// Config configures a Node. Store is required; everything else is optional.
type Config struct {
	Store  Store
	Router Router // nil: no peers
	// CacheURL is the cache tier's base URL ("http://shoal-cache.shoal.svc:5000"). Empty: none.
	CacheURL string
	// CacheTransport carries requests to the cache tier (client token, TLS). Default: a plain transport.
	CacheTransport http.RoundTripper
	// PeerTransport carries requests to peers. Default: a plain transport with short dial timeouts.
	PeerTransport http.RoundTripper
	// Registries limits which registries (?ns=) the node serves. Requests
	// for any other registry get 404 NAME_UNKNOWN, so containerd goes to
	// its next host. Empty: every registry.
	Registries []string
	// Zone is this node's topology zone, used to prefer nearby peers.
	Zone string
	// MaxPeers bounds how many providers a lookup returns. Default 5.
	MaxPeers int
	// VerifyBlobs makes the node hash every blob it relays whole and hold
	// back its last chunk until the digest checks out, for clients that do
	// not verify. Off, blobs from peers move by splice(2) without a copy
	// through user space; containerd verifies every blob itself.
	VerifyBlobs bool
	// StripeMinSize is the smallest blob (or requested range) fetched from
	// several peers at once, as parallel ranges. Default 32 MiB.
	StripeMinSize int64
	// StripeMaxPeers caps how many peers one striped fetch uses; below 2,
	// nothing is striped. Default 4.
	StripeMaxPeers int
	// StripeChunk is the size of one range of a striped fetch; up to two
	// per peer are buffered. Default 4 MiB.
	StripeChunk int64
	// HedgeDelay is how long to wait for a peer's response headers before asking the next peer too. Default 150ms.
	HedgeDelay time.Duration
	// LookupTimeout bounds one DHT lookup. Default 1s.
	LookupTimeout time.Duration
	// PeerCoolDown is how long a failed peer is skipped. Default 30s.
	PeerCoolDown time.Duration
	// IdleTimeout fails a relayed body (peer or cache tier) that sends no
	// bytes for this long; a peer's transfer then resumes elsewhere.
	// Default 10s.
	IdleTimeout time.Duration
	// PeerKey signs this node's requests to peers and, on PeerHandler,
	// checks theirs. The zero PeerKey signs and checks nothing.
	PeerKey auth.PeerKey
	// TrustPeerTags lets peers answer tag requests when the cache tier
	// cannot. Set it only inside a PSK network: any DHT member can answer
	// a tag with an image of its own choosing.
	TrustPeerTags bool
	Logger        *slog.Logger
	Registerer    prometheus.Registerer
}

func (c *Config) setDefaults() {
	if c.MaxPeers <= 0 {
		c.MaxPeers = 5
	}
	if c.StripeMinSize <= 0 {
		c.StripeMinSize = 32 << 20
	}
	if c.StripeMaxPeers == 0 {
		c.StripeMaxPeers = 4
	}
	if c.StripeChunk <= 0 {
		c.StripeChunk = 4 << 20
	}
	if c.HedgeDelay <= 0 {
		c.HedgeDelay = 150 * time.Millisecond
	}
	if c.LookupTimeout <= 0 {
		c.LookupTimeout = time.Second
	}
	if c.PeerCoolDown <= 0 {
		c.PeerCoolDown = 30 * time.Second
	}
	if c.IdleTimeout <= 0 {
		c.IdleTimeout = 10 * time.Second
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.Registerer == nil {
		c.Registerer = prometheus.NewRegistry()
	}
	if c.PeerTransport == nil {
		c.PeerTransport = newTransport(500 * time.Millisecond)
	}
	if c.CacheTransport == nil {
		c.CacheTransport = newTransport(2 * time.Second)
	}
}
