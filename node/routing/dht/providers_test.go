package dht

import (
	"slices"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/shoal-oci/shoal/node/routing/dht/wire"
)

func TestProviderCache(t *testing.T) {
	now := time.Unix(1000, 0)
	c := newProviderCache(100, time.Hour, func() time.Time { return now })
	a, b := peer.ID("peer-a"), peer.ID("peer-b")
	k1, k2 := wire.HashKey("k1"), wire.HashKey("k2")

	c.add(a, false, k1, k2)
	c.add(b, true, k1)
	c.add(b, true, k1) // no duplicates
	if got := c.get(k1); !slices.Equal(got, []peer.ID{a, b}) {
		t.Fatalf("holders of k1 = %v, want [a b]", got)
	}
	// A withdrawal or a 404 drops the holder, and a DHT record does not
	// bring it back until the TTL has passed; its own announcement does.
	c.forget(b, time.Minute, k1)
	if n := c.add(b, true, k1); n != 0 || slices.Contains(c.get(k1), b) {
		t.Fatalf("a DHT record brought a forgotten holder back (accepted %d)", n)
	}
	now = now.Add(2 * time.Minute)
	if n := c.add(b, true, k1); n != 1 || !slices.Contains(c.get(k1), b) {
		t.Fatalf("after the TTL a DHT record is refused (accepted %d)", n)
	}
	c.forget(b, time.Minute, k1)
	if n := c.add(b, false, k1); n != 1 {
		t.Fatalf("the holder's own announcement was refused after a forget")
	}
	now = now.Add(2 * time.Hour)
	if got := c.get(k2); len(got) != 0 {
		t.Fatalf("holders of k2 after their entries lapsed = %v", got)
	}
	c.add(a, false, k2)
	c.add(b, false, k1)
	c.dropPeer(a)
	if got := c.get(k2); len(got) != 0 {
		t.Fatalf("holders of k2 after dropping a = %v", got)
	}
	if got := c.get(k1); !slices.Equal(got, []peer.ID{b}) {
		t.Fatalf("holders of k1 after dropping a = %v, want [b]", got)
	}
}

func TestProviderCacheIsBounded(t *testing.T) {
	c := newProviderCache(50, time.Hour, time.Now)
	for i := range 1000 {
		c.add(peer.ID("p"), false, wire.HashKey(string(rune(i))))
		c.forget(peer.ID("q"), time.Hour, wire.HashKey(string(rune(i))))
	}
	if n := c.Len(); n > 50 {
		t.Fatalf("cache holds %d keys, bound is 50", n)
	}
	if bound := 50/4 + 64 + 1; len(c.forgotten) > bound {
		t.Fatalf("cache holds %d forget markers, bound is %d", len(c.forgotten), bound)
	}
}

func TestLiveness(t *testing.T) {
	l := newLiveness(time.Now)
	p := peer.ID("p")
	if l.isDead(p) {
		t.Fatal("a peer never seen is dead")
	}
	l.markDead(p)
	if !l.isDead(p) || len(l.snapshot()) != 1 {
		t.Fatal("markDead did not stick")
	}
	l.markAlive(p)
	if l.isDead(p) {
		t.Fatal("markAlive did not revive")
	}
}
