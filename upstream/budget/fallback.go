package budget

import (
	"context"
	"errors"
	"time"
)

// Health says whether the primary State's backend (Redis) is reachable now.
// *health.Watcher implements it.
type Health interface {
	Up() bool
	Report(err error)
}

// FallbackState is a State that uses primary (Redis) while it answers and
// fallback (in process) while it does not, so that a Redis outage degrades
// the budget to this replica's own view instead of blocking or failing
// pulls. Whatever was learned during the outage stays in fallback; the
// next ratelimit header upstream sends after recovery corrects primary.
type FallbackState struct {
	primary, fallback State
	health            Health
}

// primaryTimeout bounds one call to the primary: a Redis that hangs must
// cost a pull a moment, not its whole deadline.
const primaryTimeout = time.Second

// NewFallbackState returns a FallbackState. health may be nil: then every
// call tries primary first.
func NewFallbackState(primary, fallback State, health Health) *FallbackState {
	return &FallbackState{primary: primary, fallback: fallback, health: health}
}

func (s *FallbackState) usePrimary() bool { return s.health == nil || s.health.Up() }

// failed reports whether err means the primary could not answer (as
// opposed to the caller giving up), and tells health.
func (s *FallbackState) failed(ctx context.Context, err error) bool {
	if err == nil || ctx.Err() != nil || errors.Is(err, context.Canceled) {
		return false
	}
	if s.health != nil {
		s.health.Report(err)
	}
	return true
}

// Load implements State.
func (s *FallbackState) Load(ctx context.Context, key Key) (Record, error) {
	if s.usePrimary() {
		pctx, cancel := context.WithTimeout(ctx, primaryTimeout)
		r, err := s.primary.Load(pctx, key)
		cancel()
		if !s.failed(ctx, err) {
			return r, err
		}
	}
	return s.fallback.Load(ctx, key)
}

// Update implements State.
func (s *FallbackState) Update(ctx context.Context, key Key, fn func(*Record) time.Duration) (Record, error) {
	if s.usePrimary() {
		pctx, cancel := context.WithTimeout(ctx, primaryTimeout)
		r, err := s.primary.Update(pctx, key, fn)
		cancel()
		if !s.failed(ctx, err) {
			return r, err
		}
	}
	return s.fallback.Update(ctx, key, fn)
}

// List implements State.
func (s *FallbackState) List(ctx context.Context) ([]Record, error) {
	if s.usePrimary() {
		pctx, cancel := context.WithTimeout(ctx, primaryTimeout)
		rs, err := s.primary.List(pctx)
		cancel()
		if !s.failed(ctx, err) {
			return rs, err
		}
	}
	return s.fallback.List(ctx)
}
