package node

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/shoal-oci/shoal/node/store"
)

// Run keeps the router in step with the store until ctx is done: it
// advertises every key of the first snapshot, then each added key, and
// withdraws removed ones. A later snapshot (after the store reconnects) is
// diffed against what is advertised.
func (n *Node) Run(ctx context.Context) error {
	events := make(chan store.Event, 64)
	watchErr := make(chan error, 1)
	go func() { watchErr <- n.cfg.Store.Watch(ctx, events) }()
	advertised := map[string]struct{}{}
	for {
		select {
		case <-ctx.Done():
			return nil
		case err := <-watchErr:
			if ctx.Err() != nil || err == nil {
				return nil
			}
			return fmt.Errorf("store watch: %w", err)
		case ev := <-events:
			add, remove := diff(advertised, ev)
			n.apply(ctx, add, remove)
			n.metrics.keys.Set(float64(len(advertised)))
			if ev.Kind == store.Snapshot {
				n.synced.Store(true)
			}
		}
	}
}

// diff updates set with ev and returns the keys to advertise and withdraw.
func diff(set map[string]struct{}, ev store.Event) (add, remove []string) {
	switch ev.Kind {
	case store.Snapshot:
		next := make(map[string]struct{}, len(ev.Keys))
		for _, k := range ev.Keys {
			next[k] = struct{}{}
			if _, ok := set[k]; !ok {
				add = append(add, k)
			}
		}
		for k := range set {
			if _, ok := next[k]; !ok {
				remove = append(remove, k)
				delete(set, k)
			}
		}
		for k := range next {
			set[k] = struct{}{}
		}
	case store.Added:
		for _, k := range ev.Keys {
			if _, ok := set[k]; !ok {
				set[k] = struct{}{}
				add = append(add, k)
			}
		}
	case store.Removed:
		for _, k := range ev.Keys {
			if _, ok := set[k]; ok {
				delete(set, k)
				remove = append(remove, k)
			}
		}
	}
	return add, remove
}

func (n *Node) apply(ctx context.Context, add, remove []string) {
	if n.cfg.Router == nil {
		return
	}
	if len(remove) > 0 {
		if err := n.cfg.Router.Withdraw(ctx, remove); err != nil && !errors.Is(err, context.Canceled) {
			n.cfg.Logger.WarnContext(ctx, "withdraw failed", "keys", len(remove), "err", err)
		}
	}
	if len(add) > 0 {
		start := time.Now()
		if err := n.cfg.Router.Advertise(ctx, add); err != nil && !errors.Is(err, context.Canceled) {
			n.cfg.Logger.WarnContext(ctx, "advertise failed", "keys", len(add), "err", err)
		}
		n.cfg.Logger.DebugContext(ctx, "advertised", "keys", len(add), "took", time.Since(start))
	}
}

// Ready reports whether the node has advertised its first store snapshot.
func (n *Node) Ready() bool { return n.ready() }
