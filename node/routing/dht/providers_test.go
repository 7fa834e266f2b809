package dht

import (
	"fmt"
	"runtime"
	"slices"
	"strconv"
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

// BenchmarkProviderCacheMemory reports the heap the provider cache holds
// per key, for 100,000 keys with one holder each (what 50 nodes x 2,000
// digests put into every node's cache).
func BenchmarkProviderCacheMemory(b *testing.B) {
	const keys = 100_000
	peers := make([]peer.ID, 50)
	for i := range peers {
		peers[i] = peer.ID(fmt.Sprintf("peer-%02d", i))
	}
	hs := make([]keyHash, keys)
	for i := range hs {
		hs[i] = wire.HashKey(strconv.Itoa(i))
	}
	var perKey float64
	for b.Loop() {
		var before, after runtime.MemStats
		runtime.GC()
		runtime.ReadMemStats(&before)
		c := newProviderCache(DefaultProviderCacheKeys, time.Hour, time.Now)
		for i, h := range hs {
			c.add(peers[i%len(peers)], false, h)
		}
		runtime.GC()
		runtime.ReadMemStats(&after)
		if c.Len() != keys {
			b.Fatalf("cache holds %d keys, want %d", c.Len(), keys)
		}
		perKey = float64(after.HeapAlloc-before.HeapAlloc) / keys
		runtime.KeepAlive(c)
	}
	b.ReportMetric(perKey, "bytes/key")
}
