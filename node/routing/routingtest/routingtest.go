// Package routingtest is the conformance suite that every implementation of
// the node's Router (Advertise, Withdraw, Lookup) passes.
package routingtest

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/shoal-oci/shoal/node/routing"
)

// Router is the interface under test. It matches node.Router.
type Router interface {
	// Advertise announces that this node holds keys.
	Advertise(ctx context.Context, keys []string) error
	// Withdraw stops announcing keys.
	Withdraw(ctx context.Context, keys []string) error
	// Lookup returns up to max peers (never this node itself) that advertise key.
	Lookup(ctx context.Context, key string, max int) ([]routing.Peer, error)
}

// Timeout bounds how long the suite polls for an advertisement to show up
// or for a withdrawn or dead provider to disappear. An implementation whose
// records expire after a TTL must be configured with a TTL well below it.
const Timeout = 15 * time.Second

// Conformance runs the Router assertions. newNetwork returns n routers that
// can reach each other (their bootstrap done or about to be) and stops them
// in t.Cleanup. Each subtest builds its own network.
func Conformance(t *testing.T, newNetwork func(t *testing.T, n int) []Router) {
	t.Run("advertise_on_A_is_found_from_B_and_C", func(t *testing.T) {
		rs := newNetwork(t, 3)
		self := identify(t, rs)
		key := uniqueKey(t, "sha256:")
		advertise(t, rs[0], key)
		for _, i := range []int{1, 2} {
			eventually(t, fmt.Sprintf("router %d finds router 0", i), func() (bool, string) {
				got := lookup(t, rs[i], key, 10)
				return containsID(got, self[0].ID), fmt.Sprint(got)
			})
		}
		got := lookup(t, rs[1], key, 10)
		for _, p := range got {
			if p.ID == self[0].ID && p.Addr != self[0].Addr {
				t.Fatalf("Addr of router 0 differs between lookups: %q vs %q", p.Addr, self[0].Addr)
			}
		}
	})

	t.Run("lookup_excludes_self", func(t *testing.T) {
		rs := newNetwork(t, 3)
		self := identify(t, rs)
		key := uniqueKey(t, "docker.io/library/alpine:")
		advertise(t, rs[0], key)
		advertise(t, rs[1], key)
		eventually(t, "router 0 finds router 1", func() (bool, string) {
			got := lookup(t, rs[0], key, 10)
			return containsID(got, self[1].ID), fmt.Sprint(got)
		})
		for range 3 {
			if got := lookup(t, rs[0], key, 10); containsID(got, self[0].ID) {
				t.Fatalf("router 0 found itself: %v", got)
			}
		}
	})

	t.Run("withdraw_eventually_stops_being_returned", func(t *testing.T) {
		rs := newNetwork(t, 3)
		self := identify(t, rs)
		key := uniqueKey(t, "sha256:")
		other := uniqueKey(t, "sha256:")
		advertise(t, rs[0], key, other)
		eventually(t, "router 1 finds router 0", func() (bool, string) {
			got := lookup(t, rs[1], key, 10)
			return containsID(got, self[0].ID), fmt.Sprint(got)
		})
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := rs[0].Withdraw(ctx, []string{key}); err != nil {
			t.Fatalf("Withdraw: %v", err)
		}
		eventually(t, "router 1 stops finding router 0", func() (bool, string) {
			got := lookup(t, rs[1], key, 10)
			return !containsID(got, self[0].ID), fmt.Sprint(got)
		})
		// The key that was not withdrawn is still advertised.
		if got := lookup(t, rs[2], other, 10); !containsID(got, self[0].ID) {
			t.Fatalf("key that was not withdrawn is gone: %v", got)
		}
	})

	t.Run("several_providers_are_returned", func(t *testing.T) {
		rs := newNetwork(t, 3)
		self := identify(t, rs)
		key := uniqueKey(t, "sha256:")
		advertise(t, rs[0], key)
		advertise(t, rs[1], key)
		eventually(t, "router 2 finds routers 0 and 1", func() (bool, string) {
			got := lookup(t, rs[2], key, 10)
			return containsID(got, self[0].ID) && containsID(got, self[1].ID) && len(got) == 2, fmt.Sprint(got)
		})
		if got := lookup(t, rs[2], key, 1); len(got) != 1 {
			t.Fatalf("Lookup with max 1 returned %d peers: %v", len(got), got)
		}
	})

	t.Run("unknown_key_returns_empty_not_error", func(t *testing.T) {
		rs := newNetwork(t, 3)
		identify(t, rs)
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		got, err := rs[1].Lookup(ctx, uniqueKey(t, "sha256:"), 10)
		if err != nil {
			t.Fatalf("Lookup of unknown key: %v", err)
		}
		if len(got) != 0 {
			t.Fatalf("Lookup of unknown key returned %v", got)
		}
	})
}

// identify learns each router's own Peer by having it advertise a probe key
// that the next router looks up. It also checks that every peer has an ID
// and an Addr.
func identify(t *testing.T, rs []Router) []routing.Peer {
	t.Helper()
	self := make([]routing.Peer, len(rs))
	for i, r := range rs {
		key := uniqueKey(t, fmt.Sprintf("routingtest/probe/%d/", i))
		advertise(t, r, key)
		j := (i + 1) % len(rs)
		eventually(t, fmt.Sprintf("router %d finds the probe of router %d", j, i), func() (bool, string) {
			got := lookup(t, rs[j], key, 10)
			if len(got) == 1 {
				self[i] = got[0]
			}
			return len(got) == 1, fmt.Sprint(got)
		})
		if self[i].ID == "" || self[i].Addr == "" {
			t.Fatalf("router %d is found with an empty ID or Addr: %+v", i, self[i])
		}
	}
	for i := range self {
		for j := range i {
			if self[i].ID == self[j].ID {
				t.Fatalf("routers %d and %d share the ID %q", i, j, self[i].ID)
			}
		}
	}
	return self
}

func advertise(t *testing.T, r Router, keys ...string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := r.Advertise(ctx, keys); err != nil {
		t.Fatalf("Advertise(%v): %v", keys, err)
	}
}

func lookup(t *testing.T, r Router, key string, max int) []routing.Peer {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	got, err := r.Lookup(ctx, key, max)
	if err != nil {
		t.Fatalf("Lookup(%q): %v", key, err)
	}
	if len(got) > max {
		t.Fatalf("Lookup(%q, %d) returned %d peers", key, max, len(got))
	}
	return got
}

func eventually(t *testing.T, what string, cond func() (bool, string)) {
	t.Helper()
	deadline := time.Now().Add(Timeout)
	for {
		ok, state := cond()
		if ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting until %s; last state: %s", Timeout, what, state)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func containsID(peers []routing.Peer, id string) bool {
	return slices.ContainsFunc(peers, func(p routing.Peer) bool { return p.ID == id })
}

func uniqueKey(t *testing.T, prefix string) string {
	t.Helper()
	b := make([]byte, 16)
	if _, err := rand.Read(b); err != nil {
		t.Fatalf("random key: %v", err)
	}
	return prefix + hex.EncodeToString(b)
}
