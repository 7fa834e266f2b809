package dht

import (
	"context"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/protocol"
	"github.com/libp2p/go-msgio"

	"github.com/shoal-oci/shoal/node/routing/dht/wire"
)

// Holdings fill the provider cache of a node that joins after its peers
// announced what they hold. Announcements go out once, when content
// arrives; a node started later (a scale-up, a restart) would otherwise
// learn every key by a DHT query, one lookup at a time. So when a node
// connects to a peer for the first time, it asks that peer for the keys the
// peer itself holds, over holdingsProtocol, and the peer answers with
// announcement messages (package wire), each prefixed by its length as a
// uvarint, then closes the stream.
//
// A peer answers only for itself, as an announcement does, and libp2p's
// connection security says who it is: a node cannot claim content for
// another. A node learns the holdings of the peers it connects to, which in
// a cluster of a few hundred nodes is most of them; the DHT answers for
// the rest.
const (
	holdingsProtocol = protocol.ID("/shoal/holdings/1")
	// holdingsTimeout bounds one exchange, either side.
	holdingsTimeout = 10 * time.Second
	// holdingsParallel bounds the fetches in flight: a node that joins a
	// large cluster connects to many peers at once.
	holdingsParallel = 4
)

// serveHoldings answers a peer's holdings request with this node's
// advertised keys.
func (r *Router) serveHoldings(s network.Stream) {
	defer s.Close()
	_ = s.SetDeadline(time.Now().Add(holdingsTimeout))
	r.mu.Lock()
	keys := make([]keyHash, 0, len(r.keys))
	for k := range r.keys {
		keys = append(keys, k)
	}
	r.mu.Unlock()
	w := msgio.NewVarintWriter(s)
	for _, m := range wire.Encode(wire.OpAdd, keys) {
		if err := w.WriteMsg(m); err != nil {
			_ = s.Reset()
			r.log.Debug("holdings not sent", "peer", s.Conn().RemotePeer(), "error", err)
			return
		}
	}
}

// holdingsSoon fetches id's holdings in the background, once per peer.
func (r *Router) holdingsSoon(id peer.ID) {
	if !r.claim(r.holdingsAsked, id) {
		return
	}
	go func() {
		defer r.wg.Done()
		select {
		case r.holdingsSem <- struct{}{}:
		case <-r.ctx.Done():
			return
		}
		defer func() { <-r.holdingsSem }()
		ctx, cancel := context.WithTimeout(r.ctx, holdingsTimeout)
		defer cancel()
		n, err := r.fetchHoldings(ctx, id)
		if err != nil {
			// An older node does not speak the protocol; one that failed
			// mid-way is asked again when it next connects.
			r.log.Debug("holdings not fetched", "peer", id, "keys", n, "error", err)
			r.unclaim(r.holdingsAsked, id)
			return
		}
		r.metrics.cachedKeys.Set(float64(r.cache.Len()))
	}()
}

var errBadHoldings = errors.New("bad holdings message")

// fetchHoldings asks id for its keys and adds them to the provider cache.
// It returns how many keys it added.
func (r *Router) fetchHoldings(ctx context.Context, id peer.ID) (int, error) {
	s, err := r.host.NewStream(ctx, id, holdingsProtocol)
	if err != nil {
		return 0, fmt.Errorf("open holdings stream: %w", err)
	}
	defer s.Close()
	if d, ok := ctx.Deadline(); ok {
		_ = s.SetDeadline(d)
	}
	_ = s.CloseWrite()
	rd := msgio.NewVarintReaderSize(s, wire.MaxSize)
	n := 0
	for msgs := 0; ; msgs++ {
		m, err := rd.ReadMsg()
		if errors.Is(err, io.EOF) {
			return n, nil
		}
		if err != nil {
			_ = s.Reset()
			return n, fmt.Errorf("read holdings: %w", err)
		}
		a, err := wire.Decode(m)
		rd.ReleaseMsg(m)
		if err == nil && a.Op != wire.OpAdd {
			err = fmt.Errorf("%w: op %d", errBadHoldings, a.Op)
		}
		if err == nil && msgs*wire.MaxKeys >= r.cfg.ProviderCacheKeys {
			// More than the cache can hold: a peer that lies about what it
			// holds gets no more of this node's memory.
			err = fmt.Errorf("%w: more than %d keys", errBadHoldings, r.cfg.ProviderCacheKeys)
		}
		if err != nil {
			_ = s.Reset()
			return n, err
		}
		r.metrics.announcements.WithLabelValues("fetched").Inc()
		n += r.cache.add(id, false, a.Keys...)
	}
}
