package dht

import (
	"bytes"
	"slices"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"
)

func TestProviderCache(t *testing.T) {
	now := time.Unix(1000, 0)
	c := newProviderCache(100, time.Hour, func() time.Time { return now })
	a, b := peer.ID("peer-a"), peer.ID("peer-b")
	k1, k2 := hashKey("k1"), hashKey("k2")

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
		c.add(peer.ID("p"), false, hashKey(string(rune(i))))
		c.forget(peer.ID("q"), time.Hour, hashKey(string(rune(i))))
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

func TestAnnouncementRoundTrip(t *testing.T) {
	keys := make([]keyHash, maxAnnounceKeys+3)
	for i := range keys {
		keys[i] = hashKey(string(rune(i)))
	}
	msgs := encodeAnnouncements(opRemove, keys)
	if len(msgs) != 2 {
		t.Fatalf("%d keys made %d messages, want 2", len(keys), len(msgs))
	}
	var got []keyHash
	for _, m := range msgs {
		a, err := decodeAnnouncement(m)
		if err != nil {
			t.Fatal(err)
		}
		if a.op != opRemove {
			t.Fatalf("op = %d", a.op)
		}
		got = append(got, a.keys...)
	}
	if !slices.Equal(got, keys) {
		t.Fatal("keys changed on the way")
	}
	for _, bad := range [][]byte{
		nil,
		{announceVersion, opAdd}, // no keys
		append([]byte{9, opAdd}, make([]byte, 32)...),               // unknown version
		append([]byte{announceVersion, 7}, make([]byte, 32)...),     // unknown op
		append([]byte{announceVersion, opAdd}, make([]byte, 33)...), // not whole keys
		append([]byte{announceVersion, opAdd}, make([]byte, 32*(maxAnnounceKeys+1))...),
	} {
		if _, err := decodeAnnouncement(bad); err == nil {
			t.Errorf("decodeAnnouncement(% x...) accepted", bad[:min(len(bad), 4)])
		}
	}
}

// FuzzDecodeAnnouncement: any bytes a peer sends decode or fail cleanly,
// and what decodes encodes back to the same bytes.
func FuzzDecodeAnnouncement(f *testing.F) {
	f.Add(encodeAnnouncements(opAdd, []keyHash{hashKey("a"), hashKey("b")})[0])
	f.Add([]byte{announceVersion, opRemove})
	f.Fuzz(func(t *testing.T, b []byte) {
		a, err := decodeAnnouncement(b)
		if err != nil {
			return
		}
		again := encodeAnnouncements(a.op, a.keys)
		if len(again) != 1 || !bytes.Equal(again[0], b) {
			t.Fatalf("decode/encode changed the message")
		}
	})
}
