package flight

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"
)

// Redis is a flight shared by replicas: a Local flight whose leader first
// takes a lease in Redis (SET NX PX with a unique token, renewed every ttl/3
// while the fetch runs, released after Commit or a failed fetch). While
// another replica holds the lease it polls Job.Committed, returning
// Elsewhere once that reports true, and takes the lease over if it
// disappears uncommitted. If Redis cannot be reached it fetches without a
// lease: the cache stays available, losing only cross-replica dedup.
type Redis struct {
	local  *Local
	client redis.UniversalClient
	cfg    config
	renew  *redis.Script
	unlock *redis.Script
}

// redisCallTimeout bounds one Redis call: a Redis that hangs costs a fetch
// a moment before it goes on without a lease.
const redisCallTimeout = time.Second

// NewRedis returns a Redis flight over local and client. Options:
// WithLogger, WithLeaseTTL, WithPoll, WithKeyPrefix.
func NewRedis(local *Local, client redis.UniversalClient, opts ...Option) *Redis {
	return &Redis{
		local:  local,
		client: client,
		cfg:    newConfig(opts),
		renew: redis.NewScript(`if redis.call("get", KEYS[1]) == ARGV[1] then
  return redis.call("pexpire", KEYS[1], ARGV[2])
end
return 0`),
		unlock: redis.NewScript(`if redis.call("get", KEYS[1]) == ARGV[1] then
  return redis.call("del", KEYS[1])
end
return 0`),
	}
}

// Do is Local.Do with a lease across replicas; see Redis.
func (r *Redis) Do(ctx context.Context, key string, job Job) (Result, error) {
	relayOK := !noRelay(ctx)
	return r.local.do(ctx, key, job, func(ctx context.Context, relay bool) (gateResult, error) {
		return r.lease(ctx, key, job, relay && relayOK)
	})
}

// Drain waits until every flight of this replica has committed or failed,
// or ctx ends; see Local.Drain.
func (r *Redis) Drain(ctx context.Context) error { return r.local.Drain(ctx) }

// lease takes the lease for key, or waits until another replica commits;
// with relay, it streams from the holder instead when the holder advertises
// an address.
func (r *Redis) lease(ctx context.Context, key string, job Job, relay bool) (gateResult, error) {
	lk := r.cfg.prefix + key
	log := r.cfg.log.With("key", key)
	tok := make([]byte, 16)
	_, _ = rand.Read(tok)
	token := hex.EncodeToString(tok)
	value := token
	if r.cfg.advertise != "" {
		value += " " + r.cfg.advertise
	}
	delay, contended := r.cfg.pollMin, false
	for {
		if h := r.cfg.health; h != nil && !h.Up() {
			r.local.m.unleased.Inc()
			log.Debug("redis down: fetching without a lease")
			return gateResult{}, nil
		}
		sctx, cancel := context.WithTimeout(ctx, redisCallTimeout)
		ok, err := r.client.SetNX(sctx, lk, value, r.cfg.leaseTTL).Result()
		cancel()
		if err != nil {
			if ctx.Err() != nil {
				return gateResult{}, fmt.Errorf("flight %s: lease: %w", key, ctx.Err())
			}
			if h := r.cfg.health; h != nil {
				h.Report(err)
			}
			r.local.m.unleased.Inc()
			log.Warn("flight lease unavailable, fetching without it", "err", err)
			return gateResult{}, nil
		}
		if ok {
			if committed(ctx, job) {
				r.release(lk, value, log)
				return gateResult{elsewhere: true}, nil
			}
			if contended {
				r.local.m.takeovers.Inc()
				log.Info("flight lease taken over")
			}
			stop := r.keep(ctx, lk, value, log)
			return gateResult{release: func() { stop(); r.release(lk, value, log) }}, nil
		}
		if relay && !contended {
			if from := r.holder(ctx, lk); from != "" && from != r.cfg.advertise {
				return gateResult{relayFrom: from}, nil
			}
		}
		contended = true
		select {
		case <-ctx.Done():
			return gateResult{}, fmt.Errorf("flight %s: waiting on lease: %w", key, ctx.Err())
		case <-time.After(delay):
		}
		delay = min(2*delay, r.cfg.pollMax)
		if committed(ctx, job) {
			return gateResult{elsewhere: true}, nil
		}
	}
}

// holder returns the advertised address of the replica holding lease lk, or "".
func (r *Redis) holder(ctx context.Context, lk string) string {
	sctx, cancel := context.WithTimeout(ctx, redisCallTimeout)
	defer cancel()
	v, err := r.client.Get(sctx, lk).Result()
	if err != nil {
		return ""
	}
	_, from, _ := strings.Cut(v, " ")
	return from
}

func committed(ctx context.Context, job Job) bool {
	if job.Committed == nil {
		return false
	}
	ok, err := job.Committed(ctx)
	return err == nil && ok
}

// keep renews the lease every ttl/3 until stop is called.
func (r *Redis) keep(ctx context.Context, lk, token string, log *slog.Logger) (stop func()) {
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		t := time.NewTicker(r.cfg.leaseTTL / 3)
		defer t.Stop()
		for {
			select {
			case <-done:
				return
			case <-ctx.Done():
				return
			case <-t.C:
			}
			n, err := r.renew.Run(ctx, r.client, []string{lk}, token, r.cfg.leaseTTL.Milliseconds()).Int()
			switch {
			case err != nil:
				log.Warn("flight lease renewal failed", "err", err)
			case n == 0:
				log.Warn("flight lease lost; another replica may fetch too")
			}
		}
	}()
	return func() { close(done); wg.Wait() }
}

// release deletes the lease if it is still ours.
func (r *Redis) release(lk, token string, log *slog.Logger) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := r.unlock.Run(ctx, r.client, []string{lk}, token).Err(); err != nil {
		log.Warn("flight lease release failed", "err", err)
	}
}
