package dht

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"time"

	pubsub "github.com/libp2p/go-libp2p-pubsub"
	"github.com/libp2p/go-libp2p/core/peer"
)

// Announcements push new and removed keys to every node at once, so most
// lookups are answered from the provider cache without a DHT query. They go
// over gossipsub on announceTopic, signed by their origin (StrictSign), so a
// node can only announce for itself. They are best effort: a node that
// joins later, or misses a message, finds keys through the DHT.
//
// A message is:
//
//	byte 0     announceVersion
//	byte 1     opAdd or opRemove
//	bytes 2..  one or more 32-byte key hashes (sha256 of the key string)
const (
	announceTopic   = "/shoal/announce/1"
	announceVersion = 1
	opAdd           = 1
	opRemove        = 2
	// maxAnnounceKeys bounds one message (128 KiB of hashes); a bigger
	// batch goes out as several.
	maxAnnounceKeys = 4096
	// meshSettle is how long the topic must have had peers before the
	// first announcements go out. Gossipsub drops what is published before
	// its streams to a peer are up, and a node's first announcement is its
	// whole snapshot: it is held back until then.
	meshSettle = 2 * time.Second
	// maxPending bounds what is held back (2 MiB); older messages are
	// dropped first (the DHT still carries their keys).
	maxPending = 16
)

// announcement is a decoded message.
type announcement struct {
	op   byte
	keys []keyHash
}

func hashKey(key string) keyHash { return sha256.Sum256([]byte(key)) }

// encodeAnnouncements splits keys into messages of at most maxAnnounceKeys.
func encodeAnnouncements(op byte, keys []keyHash) [][]byte {
	var out [][]byte
	for len(keys) > 0 {
		n := min(len(keys), maxAnnounceKeys)
		b := make([]byte, 2, 2+32*n)
		b[0], b[1] = announceVersion, op
		for _, k := range keys[:n] {
			b = append(b, k[:]...)
		}
		out = append(out, b)
		keys = keys[n:]
	}
	return out
}

var errBadAnnouncement = errors.New("malformed announcement")

// decodeAnnouncement parses one message.
func decodeAnnouncement(b []byte) (announcement, error) {
	if len(b) < 2+32 {
		return announcement{}, fmt.Errorf("%w: %d bytes", errBadAnnouncement, len(b))
	}
	if b[0] != announceVersion {
		return announcement{}, fmt.Errorf("%w: version %d", errBadAnnouncement, b[0])
	}
	op := b[1]
	if op != opAdd && op != opRemove {
		return announcement{}, fmt.Errorf("%w: op %d", errBadAnnouncement, op)
	}
	body := b[2:]
	if len(body)%32 != 0 || len(body)/32 > maxAnnounceKeys {
		return announcement{}, fmt.Errorf("%w: %d bytes of keys", errBadAnnouncement, len(body))
	}
	a := announcement{op: op, keys: make([]keyHash, len(body)/32)}
	for i := range a.keys {
		copy(a.keys[i][:], body[32*i:])
	}
	return a, nil
}

// startAnnouncements joins the topic and starts the loop that feeds the
// provider cache from it.
func (r *Router) startAnnouncements(ctx context.Context) error {
	ps, err := pubsub.NewGossipSub(ctx, r.host,
		pubsub.WithMessageSignaturePolicy(pubsub.StrictSign),
		pubsub.WithMaxMessageSize(2+32*maxAnnounceKeys+1024),
	)
	if err != nil {
		return fmt.Errorf("start gossipsub: %w", err)
	}
	err = ps.RegisterTopicValidator(announceTopic, func(_ context.Context, _ peer.ID, m *pubsub.Message) bool {
		_, err := decodeAnnouncement(m.Data)
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
	msgs := encodeAnnouncements(op, keys)
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
		a, err := decodeAnnouncement(m.Data)
		if err != nil {
			continue // the validator already refused it; never reached
		}
		r.metrics.announcements.WithLabelValues("received").Inc()
		switch a.op {
		case opAdd:
			r.cache.add(from, false, a.keys...)
			r.connectSoon(from)
		case opRemove:
			r.cache.forget(from, r.cfg.ProviderTTL, a.keys...)
		}
		r.metrics.cachedKeys.Set(float64(r.cache.Len()))
	}
}
