package routing

import (
	"context"
	"sort"
	"sync"
)

// MemoryNetwork is an in-memory stand-in for the DHT, shared by several
// simulated nodes in one process. Each node gets a MemoryRouter from Node.
// It is meant for handler unit tests.
type MemoryNetwork struct {
	mu        sync.Mutex
	providers map[string]map[string]Peer // key -> peer ID -> peer
}

// NewMemoryNetwork returns an empty network.
func NewMemoryNetwork() *MemoryNetwork {
	return &MemoryNetwork{providers: make(map[string]map[string]Peer)}
}

// Node returns the router of the simulated node self. Lookups through it
// never return self.
func (n *MemoryNetwork) Node(self Peer) *MemoryRouter {
	return &MemoryRouter{net: n, self: self}
}

// MemoryRouter is one node's view of a MemoryNetwork. It implements the
// node's Router (Advertise, Withdraw, Lookup).
type MemoryRouter struct {
	net  *MemoryNetwork
	self Peer
}

// Self returns the peer this router advertises as.
func (r *MemoryRouter) Self() Peer { return r.self }

// Advertise announces that this node holds keys. Advertisements take effect
// at once.
func (r *MemoryRouter) Advertise(ctx context.Context, keys []string) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	r.net.mu.Lock()
	defer r.net.mu.Unlock()
	for _, k := range keys {
		set := r.net.providers[k]
		if set == nil {
			set = make(map[string]Peer)
			r.net.providers[k] = set
		}
		set[r.self.ID] = r.self
	}
	return nil
}

// Withdraw stops announcing keys. It takes effect at once.
func (r *MemoryRouter) Withdraw(ctx context.Context, keys []string) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	r.net.mu.Lock()
	defer r.net.mu.Unlock()
	for _, k := range keys {
		delete(r.net.providers[k], r.self.ID)
		if len(r.net.providers[k]) == 0 {
			delete(r.net.providers, k)
		}
	}
	return nil
}

// Lookup returns up to max peers other than this node that advertise key,
// ordered by peer ID. An unknown key yields an empty result and no error.
func (r *MemoryRouter) Lookup(ctx context.Context, key string, max int) ([]Peer, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	r.net.mu.Lock()
	defer r.net.mu.Unlock()
	var out []Peer
	for id, p := range r.net.providers[key] {
		if id != r.self.ID {
			out = append(out, p)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	if max >= 0 && len(out) > max {
		out = out[:max]
	}
	return out, nil
}

// Close withdraws everything this node advertised, as if it had died.
func (r *MemoryRouter) Close() error {
	r.net.mu.Lock()
	defer r.net.mu.Unlock()
	for k, set := range r.net.providers {
		delete(set, r.self.ID)
		if len(set) == 0 {
			delete(r.net.providers, k)
		}
	}
	return nil
}
