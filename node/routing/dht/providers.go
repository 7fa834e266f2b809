package dht

import (
	"sync"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/shoal-oci/shoal/node/routing/dht/wire"
)

// keyHash is the sha256 of a key string: the digest inside the key's CID,
// and the form keys take in announcements and in the provider cache.
type keyHash = wire.Hash

// providerCache remembers which peers hold which keys, learned from
// announcements and from DHT lookups. Content is immutable, so a holder
// stays a holder until it says otherwise (a withdraw announcement), a
// request to it finds nothing (Forget), or it goes away (dropPeer). An
// entry also lapses after ttl, as a DHT record does: a withdrawal whose
// announcement was lost costs a DHT query then, not a 404 forever.
//
// Memory is what bounds it: keys are kept as the first 16 bytes of their
// hash, peers are interned as small indexes, a key with one holder (the
// common case) takes one map entry of 24 bytes, and at most maxKeys keys are
// kept (arbitrary ones are dropped when full; the DHT still has them).
// Sixteen bytes of SHA-256 make a collision among maxKeys keys a 2^-90
// event, and one would only point a lookup at a holder whose bytes then
// fail the digest check.
type providerCache struct {
	maxKeys int
	ttl     time.Duration
	now     func() time.Time

	mu      sync.Mutex
	epoch   time.Time                // holder.until counts seconds from here
	peers   interner[peer.ID]        // holder.peer indexes it
	holders sparse[cacheKey, holder] // each key's holders
	// forgotten holds (key, peer) pairs a request found missing: a DHT
	// record for them is ignored until it would have expired.
	forgotten map[forgetKey]time.Time
}

// holder is one peer holding a key, until its entry lapses.
type holder struct {
	peer  uint32
	until uint32 // seconds after the cache's epoch
}

// cacheKey is the part of a key's hash the cache keeps.
type cacheKey [16]byte

func cacheKeyOf(k keyHash) cacheKey { return cacheKey(k[:16]) }

type forgetKey struct {
	key  cacheKey
	peer uint32
}

func newProviderCache(maxKeys int, ttl time.Duration, now func() time.Time) *providerCache {
	return &providerCache{
		maxKeys:   maxKeys,
		ttl:       ttl,
		now:       now,
		epoch:     now(),
		peers:     newInterner[peer.ID](),
		holders:   newSparse[cacheKey, holder](),
		forgotten: make(map[forgetKey]time.Time),
	}
}

func (c *providerCache) seconds(t time.Time) uint32 {
	d := t.Sub(c.epoch) / time.Second
	return uint32(min(max(d, 0), 1<<32-1))
}

// add records p as a holder of keys and returns how many it accepted.
// fromDHT marks what a lookup found, which a recent withdrawal or Forget
// overrides; an announcement from p itself always counts.
func (c *providerCache) add(p peer.ID, fromDHT bool, keys ...keyHash) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	i := c.peers.id(p)
	now := c.now()
	accepted := 0
	for _, kh := range keys {
		k := cacheKeyOf(kh)
		fk := forgetKey{k, i}
		if until, ok := c.forgotten[fk]; ok {
			if fromDHT && now.Before(until) {
				continue
			}
			delete(c.forgotten, fk)
		}
		accepted++
		hs := c.holders.get(k)
		if len(hs) == 0 && c.size() >= c.maxKeys {
			c.shrink()
		}
		until := c.seconds(now.Add(c.ttl))
		if j := indexOfPeer(hs, i); j >= 0 {
			hs[j].until = until
		} else {
			hs = append(hs, holder{peer: i, until: until})
		}
		c.holders.put(k, hs)
	}
	return accepted
}

// shrink drops about a tenth of the keys. Map iteration order is random,
// so the victims are too.
func (c *providerCache) shrink() {
	n := max(c.maxKeys/10, 1)
	for k := range c.holders.one {
		delete(c.holders.one, k)
		if n--; n == 0 {
			return
		}
	}
	for k := range c.holders.many {
		delete(c.holders.many, k)
		if n--; n == 0 {
			return
		}
	}
}

// forget drops p as a holder of keys, and ignores DHT records saying
// otherwise for ttl (until they would have expired): p withdrew the keys,
// or was asked and did not have them.
func (c *providerCache) forget(p peer.ID, ttl time.Duration, keys ...keyHash) {
	c.mu.Lock()
	defer c.mu.Unlock()
	i := c.peers.id(p)
	now := c.now()
	for _, kh := range keys {
		k := cacheKeyOf(kh)
		c.drop(k, i)
		c.forgotten[forgetKey{k, i}] = now.Add(ttl)
	}
	if len(c.forgotten) > c.maxKeys/4+64 {
		for fk, until := range c.forgotten {
			if !now.Before(until) {
				delete(c.forgotten, fk)
			}
		}
		if len(c.forgotten) > c.maxKeys {
			// Markers only spare requesters a 404; memory comes first.
			clear(c.forgotten)
		}
	}
}

func (c *providerCache) drop(k cacheKey, i uint32) { removePeer(c.holders, k, i) }

// dropPeer forgets everything p holds (p is gone for good).
func (c *providerCache) dropPeer(p peer.ID) {
	c.mu.Lock()
	defer c.mu.Unlock()
	i, ok := c.peers.lookup(p)
	if !ok {
		return
	}
	for k, h := range c.holders.one {
		if h.peer == i {
			delete(c.holders.one, k)
		}
	}
	for k, hs := range c.holders.many {
		if indexOfPeer(hs, i) >= 0 {
			c.drop(k, i)
		}
	}
}

// get returns the known holders of key whose entries have not lapsed.
func (c *providerCache) get(key keyHash) []peer.ID {
	c.mu.Lock()
	defer c.mu.Unlock()
	hs := c.holders.get(cacheKeyOf(key))
	now := c.seconds(c.now())
	out := make([]peer.ID, 0, len(hs))
	for _, h := range hs {
		if now < h.until {
			out = append(out, c.peers.value(h.peer))
		}
	}
	return out
}

// Len returns how many keys have known holders.
func (c *providerCache) Len() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.size()
}

func (c *providerCache) size() int { return c.holders.keys() }

func (h holder) peerIndex() uint32 { return h.peer }

// liveness tracks peers that could not be reached, so a dead node costs at
// most one failed dial: after that, lookups skip it until it connects again
// (or a background probe reaches it).
type liveness struct {
	now func() time.Time

	mu   sync.Mutex
	dead map[peer.ID]time.Time // peer -> when its dial failed
}

func newLiveness(now func() time.Time) *liveness {
	return &liveness{now: now, dead: make(map[peer.ID]time.Time)}
}

func (l *liveness) markDead(p peer.ID) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if _, ok := l.dead[p]; !ok {
		l.dead[p] = l.now()
	}
}

func (l *liveness) markAlive(p peer.ID) {
	l.mu.Lock()
	defer l.mu.Unlock()
	delete(l.dead, p)
}

func (l *liveness) isDead(p peer.ID) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	_, ok := l.dead[p]
	return ok
}

// snapshot returns the dead peers and when each was found dead.
func (l *liveness) snapshot() map[peer.ID]time.Time {
	l.mu.Lock()
	defer l.mu.Unlock()
	out := make(map[peer.ID]time.Time, len(l.dead))
	for p, t := range l.dead {
		out[p] = t
	}
	return out
}
