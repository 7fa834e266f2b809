package routing_test

import (
	"context"
	"fmt"
	"testing"

	"github.com/shoal-oci/shoal/node/routing"
	"github.com/shoal-oci/shoal/node/routing/routingtest"
)

func TestMemoryConformance(t *testing.T) {
	routingtest.Conformance(t, func(t *testing.T, n int) []routingtest.Router {
		net := routing.NewMemoryNetwork()
		rs := make([]routingtest.Router, n)
		for i := range rs {
			rs[i] = net.Node(routing.Peer{ID: fmt.Sprintf("peer-%d", i), Addr: fmt.Sprintf("http://127.0.0.%d:5000", i+1)})
		}
		return rs
	})
}

func TestMemoryRouterCloseWithdrawsEverything(t *testing.T) {
	ctx := context.Background()
	net := routing.NewMemoryNetwork()
	a := net.Node(routing.Peer{ID: "a"})
	b := net.Node(routing.Peer{ID: "b"})
	if err := a.Advertise(ctx, []string{"k1", "k2"}); err != nil {
		t.Fatal(err)
	}
	if got, _ := b.Lookup(ctx, "k1", 5); len(got) != 1 {
		t.Fatalf("before Close: %v", got)
	}
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{"k1", "k2"} {
		if got, err := b.Lookup(ctx, k, 5); err != nil || len(got) != 0 {
			t.Fatalf("after Close, Lookup(%s) = %v, %v", k, got, err)
		}
	}
}
