package containerd

import (
	"context"
	"errors"
	"fmt"
	"time"

	eventstypes "github.com/containerd/containerd/api/events"
	"github.com/containerd/containerd/v2/core/events"
	"github.com/containerd/typeurl/v2"
	"github.com/opencontainers/go-digest"

	"github.com/shoal-oci/shoal/node/store"
)

// Backoff bounds for re-subscribing after the event stream breaks.
const (
	minBackoff = 100 * time.Millisecond
	maxBackoff = 2 * time.Second
)

// Watch sends a Snapshot of every key, then Added and Removed events as
// containerd's images and content change. When the event stream breaks (a
// containerd restart), it re-subscribes with backoff and sends a fresh
// Snapshot. It returns nil when ctx is done.
func (s *Store) Watch(ctx context.Context, ch chan<- store.Event) error {
	backoff := minBackoff
	for {
		snapshotSent, err := s.watchOnce(ctx, ch)
		if ctx.Err() != nil {
			return nil
		}
		if snapshotSent {
			backoff = minBackoff
		}
		s.metrics.resubscribes.Inc()
		s.log.Warn("containerd event stream lost; re-subscribing", "err", err, "backoff", backoff)
		t := time.NewTimer(backoff)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil
		case <-t.C:
		}
		backoff = min(backoff*2, maxBackoff)
	}
}

// watchOnce subscribes, sends a Snapshot and follows events and the poll
// until the stream or a rescan fails. It says whether it sent the Snapshot.
func (s *Store) watchOnce(ctx context.Context, ch chan<- store.Event) (bool, error) {
	sctx, cancel := context.WithCancel(s.nsCtx(ctx))
	defer cancel()
	// Subscribe before the scan, so that nothing between the two is lost.
	nsFilter := fmt.Sprintf("namespace==%q", s.ns)
	evs, errs := s.client.EventService().Subscribe(sctx,
		nsFilter+`,topic~="^/images/"`, nsFilter+`,topic~="^/content/"`)
	if err := s.rescan(sctx); err != nil {
		return false, err
	}
	sent := s.currentView().Keys
	if err := send(ctx, ch, store.Event{Kind: store.Snapshot, Keys: store.SortedKeys(sent)}); err != nil {
		return false, err
	}
	tick := time.NewTicker(s.poll)
	defer tick.Stop()
	for {
		var err error
		select {
		case <-ctx.Done():
			return true, ctx.Err()
		case err = <-errs:
			if err == nil {
				err = errors.New("event stream closed")
			}
			return true, err
		case env, ok := <-evs:
			if !ok {
				return true, errors.New("event stream closed")
			}
			err = s.handle(sctx, env)
		case <-tick.C:
			err = s.rescan(sctx)
		}
		if err != nil {
			return true, err
		}
		if sent, err = s.sendDiff(ctx, ch, sent); err != nil {
			return true, err
		}
	}
}

// handle applies one containerd event to the state.
func (s *Store) handle(ctx context.Context, env *events.Envelope) error {
	if env == nil || env.Event == nil {
		return nil
	}
	ev, err := typeurl.UnmarshalAny(env.Event)
	if err != nil {
		s.log.Debug("undecodable event", "topic", env.Topic, "err", err)
		return nil
	}
	switch e := ev.(type) {
	case *eventstypes.ImageCreate:
		return s.refreshImage(ctx, e.Name)
	case *eventstypes.ImageUpdate:
		return s.refreshImage(ctx, e.Name)
	case *eventstypes.ImageDelete:
		s.dropImage(e.Name)
	case *eventstypes.ContentCreate:
		if d, err := digest.Parse(e.Digest); err == nil {
			return s.contentChanged(ctx, d, true)
		}
	case *eventstypes.ContentDelete:
		if d, err := digest.Parse(e.Digest); err == nil {
			return s.contentChanged(ctx, d, false)
		}
	}
	return nil
}

// sendDiff sends what changed since sent and returns the new sent set.
func (s *Store) sendDiff(ctx context.Context, ch chan<- store.Event, sent map[string]struct{}) (map[string]struct{}, error) {
	now := s.currentView().Keys
	added, removed := store.Diff(sent, now)
	if len(added) > 0 {
		if err := send(ctx, ch, store.Event{Kind: store.Added, Keys: added}); err != nil {
			return sent, err
		}
	}
	if len(removed) > 0 {
		if err := send(ctx, ch, store.Event{Kind: store.Removed, Keys: removed}); err != nil {
			return sent, err
		}
	}
	return now, nil
}

func send(ctx context.Context, ch chan<- store.Event, ev store.Event) error {
	select {
	case ch <- ev:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}
