package dht

import (
	"context"
	"fmt"
	"time"

	pubsub "github.com/libp2p/go-libp2p-pubsub"
	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/shoal-oci/shoal/node/routing/dht/wire"
)

// Announcements push new and removed keys to every node at once, so most
// lookups are answered from the provider cache without a DHT query. They go
// over gossipsub on announceTopic, signed by their origin (StrictSign), so a
// node can only announce for itself. They are best effort: a node that
// joins later, or misses a message, finds keys through the DHT (or a
// peer's holdings, holdings.go). The message format is package wire.
const (
	announceTopic = "/shoal/announce/1"
	// meshSettle is how long the topic must have had peers before the
	// first announcements go out. Gossipsub drops what is published before
	// its streams to a peer are up, and a node's first announcement is its
	// whole snapshot: it is held back until then.
	meshSettle = 2 * time.Second
	// maxPending bounds what is held back (2 MiB); older messages are
	// dropped first (the DHT still carries their keys).
	maxPending = 16
)

// startAnnouncements joins the topic and starts the loop that feeds the
// provider cache from it.
func (r *Router) startAnnouncements(ctx context.Context) error {
	ps, err := pubsub.NewGossipSub(ctx, r.host,
		pubsub.WithMessageSignaturePolicy(pubsub.StrictSign),
		pubsub.WithMaxMessageSize(wire.MaxSize+1024),
	)
	if err != nil {
		return fmt.Errorf("start gossipsub: %w", err)
	}
	err = ps.RegisterTopicValidator(announceTopic, func(_ context.Context, _ peer.ID, m *pubsub.Message) bool {
		_, err := wire.Decode(m.Data)
		return err == nil
	})
	if err != nil {
		return fmt.Errorf("register announcement validator: %w", err)
	}
	topic, err := ps.Join(announceTopic)
	if err != nil {
		return fmt.Errorf("join %s: %w", announceTopic, err)
	}
	sub, err := topic.Subscribe(pubsub.WithBufferSize(256))
	if err != nil {
		return fmt.Errorf("subscribe %s: %w", announceTopic, err)
	}
	r.topic = topic
	r.wg.Add(1)
	go r.receiveAnnouncements(ctx, sub)
	return nil
}

// announce publishes keys (best effort: a failure is counted and logged,
// the DHT still has them). Until the topic has had peers for meshSettle,
// messages are held back and sent in order then.
func (r *Router) announce(ctx context.Context, op byte, keys []keyHash) {
	msgs := wire.Encode(op, keys)
	r.annMu.Lock()
	if !r.annLive {
		r.pending = append(r.pending, msgs...)
		if over := len(r.pending) - maxPending; over > 0 {
			r.pending = append(r.pending[:0:0], r.pending[over:]...)
		}
		r.annMu.Unlock()
		return
	}
	r.annMu.Unlock()
	r.publish(ctx, msgs)
}

// releasePending is called every tick until it returns true: once the topic
// has had peers for meshSettle, it sends what announce held back.
func (r *Router) releasePending(ctx context.Context, now time.Time) bool {
	if len(r.topic.ListPeers()) == 0 {
		r.meshSince = time.Time{}
		return false
	}
	if r.meshSince.IsZero() {
		r.meshSince = now
	}
	if now.Sub(r.meshSince) < meshSettle {
		return false
	}
	r.annMu.Lock()
	r.annLive = true
	msgs := r.pending
	r.pending = nil
	r.annMu.Unlock()
	r.publish(ctx, msgs)
	return true
}

func (r *Router) publish(ctx context.Context, msgs [][]byte) {
	for _, msg := range msgs {
		if err := r.topic.Publish(ctx, msg); err != nil {
			r.metrics.announceErrors.Inc()
			r.log.Debug("announcement not published", "keys", (len(msg)-2)/32, "error", err)
			return
		}
		r.metrics.announcements.WithLabelValues("sent").Inc()
	}
}

func (r *Router) receiveAnnouncements(ctx context.Context, sub *pubsub.Subscription) {
	defer r.wg.Done()
	defer sub.Cancel()
	self := r.host.ID()
	for {
		m, err := sub.Next(ctx)
		if err != nil {
			return // ctx done or subscription cancelled
		}
		from := m.GetFrom()
		if from == self {
			continue
		}
		a, err := wire.Decode(m.Data)
		if err != nil {
			continue // the validator already refused it; never reached
		}
		r.metrics.announcements.WithLabelValues("received").Inc()
		switch a.Op {
		case wire.OpAdd:
			r.cache.add(from, false, a.Keys...)
			r.connectSoon(from)
		case wire.OpRemove:
			r.cache.forget(from, r.cfg.ProviderTTL, a.Keys...)
		}
		r.metrics.cachedKeys.Set(float64(r.cache.Len()))
	}
}
