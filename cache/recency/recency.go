// Package recency shares, through Redis, what cache replicas need for
// eviction: when each cached digest was last used, a lock so that one pass
// runs at a time, and an inventory of what the storage holds, so that a
// pass reads Redis instead of listing the object store. Without it each
// replica would evict by its own view, and one replica could remove what
// another is serving.
package recency

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"log/slog"
	"strconv"
	"sync"
	"time"

	"github.com/opencontainers/go-digest"
	"github.com/redis/go-redis/v9"
)

// Health says whether Redis is reachable now (*health.Watcher implements it).
type Health interface {
	Up() bool
	Report(err error)
}

// Redis keeps last-use times in one Redis hash (digest → unix milliseconds)
// and the eviction lock in one key. Touch only buffers; a loop started by
// Run writes the buffer every flush interval, so serving never waits on
// Redis.
type Redis struct {
	c      redis.UniversalClient
	hash   string
	lock   string
	health Health
	log    *slog.Logger
	flush  time.Duration

	inv string // prefix of the inventory's keys

	mu         sync.Mutex
	pending    map[digest.Digest]time.Time
	pendingInv []invOp
	// maxInv bounds pendingInv: while Redis is down for long, a replica
	// that keeps storing would otherwise buffer without end.
	maxInv int
	// invDropped is when this replica last dropped buffered inventory
	// changes and has not yet told Redis (zero: nothing to tell).
	invDropped time.Time

	setMax, unlock               *redis.Script
	addBlob, removeBlob, recount *redis.Script
	markComplete                 *redis.Script
}

// NewRedis returns a Redis recency under keys that start with prefix
// ("shoal:evict:"). health may be nil.
func NewRedis(c redis.UniversalClient, prefix string, health Health, log *slog.Logger) *Redis {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Redis{
		c: c, hash: prefix + "recency", lock: prefix + "lock", inv: prefix + "inv:", health: health, log: log, flush: time.Second,
		pending: map[digest.Digest]time.Time{}, maxInv: maxPendingInv,
		// HSET only when newer: replicas' writes race, the latest use wins.
		setMax: redis.NewScript(`for i = 1, #ARGV, 2 do
  local cur = redis.call("HGET", KEYS[1], ARGV[i])
  if not cur or tonumber(cur) < tonumber(ARGV[i+1]) then
    redis.call("HSET", KEYS[1], ARGV[i], ARGV[i+1])
  end
end
return 0`),
		unlock: redis.NewScript(`if redis.call("get", KEYS[1]) == ARGV[1] then
  return redis.call("del", KEYS[1])
end
return 0`),
		// The inventory: a blob's size joins the total only when the blob
		// is new to it, and leaves it only when the blob was in it.
		addBlob: redis.NewScript(`if redis.call("HSETNX", KEYS[1], ARGV[1], ARGV[2] .. ":" .. ARGV[3]) == 1 then
  redis.call("INCRBY", KEYS[2], ARGV[2])
end
return 0`),
		removeBlob: redis.NewScript(`local v = redis.call("HGET", KEYS[1], ARGV[1])
if v then
  redis.call("HDEL", KEYS[1], ARGV[1])
  redis.call("DECRBY", KEYS[2], string.match(v, "^(%d+)"))
end
return 0`),
		recount: redis.NewScript(`local total = 0
for _, v in ipairs(redis.call("HVALS", KEYS[1])) do
  total = total + tonumber(string.match(v, "^(%d+)"))
end
redis.call("SET", KEYS[2], total)
return total`),
		// A walk completes the inventory only if no replica dropped
		// changes after it started (KEYS[2] "at", in µs): those may be
		// missing from both the walk and the inventory.
		markComplete: redis.NewScript(`local dropped = tonumber(redis.call("HGET", KEYS[2], "at") or "0")
if dropped < tonumber(ARGV[1]) then
  redis.call("SET", KEYS[1], ARGV[2], "PX", ARGV[3])
  return 1
end
return 0`),
	}
}

func (r *Redis) up() bool { return r.health == nil || r.health.Up() }

func (r *Redis) failed(err error) {
	if r.health != nil {
		r.health.Report(err)
	}
}

// Touch records that d was used at t. It never blocks on Redis.
func (r *Redis) Touch(d digest.Digest, t time.Time) {
	r.mu.Lock()
	if t.After(r.pending[d]) {
		r.pending[d] = t
	}
	r.mu.Unlock()
}

// Flush writes the buffered uses and inventory changes now. What cannot be
// written stays buffered for the next try.
func (r *Redis) Flush(ctx context.Context) error {
	if !r.up() {
		return fmt.Errorf("recency: redis down")
	}
	if err := r.flushInv(ctx); err != nil {
		return err
	}
	return r.flushUses(ctx)
}

// flushUses writes the buffered uses (Flush has checked that Redis is up).
func (r *Redis) flushUses(ctx context.Context) error {
	r.mu.Lock()
	batch := r.pending
	r.pending = map[digest.Digest]time.Time{}
	r.mu.Unlock()
	if len(batch) == 0 {
		return nil
	}
	args := make([]any, 0, 2*len(batch))
	for d, t := range batch {
		args = append(args, d.String(), t.UnixMilli())
	}
	cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	if err := r.setMax.Run(cctx, r.c, []string{r.hash}, args...).Err(); err != nil {
		r.requeue(batch)
		r.failed(err)
		return fmt.Errorf("recency: flush: %w", err)
	}
	return nil
}

func (r *Redis) requeue(batch map[digest.Digest]time.Time) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for d, t := range batch {
		if t.After(r.pending[d]) {
			r.pending[d] = t
		}
	}
}

// Run flushes every second until ctx ends, then once more.
func (r *Redis) Run(ctx context.Context) {
	t := time.NewTicker(r.flush)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			fctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			_ = r.Flush(fctx)
			cancel()
			return
		case <-t.C:
			if err := r.Flush(ctx); err != nil && ctx.Err() == nil {
				r.log.Debug("recency flush deferred", "err", err)
			}
		}
	}
}

// LastUse returns the latest use every replica recorded for each of ds
// (absent: never recorded). It flushes this replica's buffer first.
func (r *Redis) LastUse(ctx context.Context, ds []digest.Digest) (map[digest.Digest]time.Time, error) {
	if err := r.Flush(ctx); err != nil {
		return nil, err
	}
	out := make(map[digest.Digest]time.Time, len(ds))
	for start := 0; start < len(ds); start += 500 {
		part := ds[start:min(start+500, len(ds))]
		fields := make([]string, len(part))
		for i, d := range part {
			fields[i] = d.String()
		}
		cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		vals, err := r.c.HMGet(cctx, r.hash, fields...).Result()
		cancel()
		if err != nil {
			r.failed(err)
			return nil, fmt.Errorf("recency: read: %w", err)
		}
		for i, v := range vals {
			s, ok := v.(string)
			if !ok {
				continue
			}
			if ms, err := strconv.ParseInt(s, 10, 64); err == nil {
				out[part[i]] = time.UnixMilli(ms)
			}
		}
	}
	return out, nil
}

// Forget drops the records of evicted digests.
func (r *Redis) Forget(ctx context.Context, ds ...digest.Digest) error {
	if len(ds) == 0 {
		return nil
	}
	fields := make([]string, len(ds))
	for i, d := range ds {
		fields[i] = d.String()
	}
	cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	return r.c.HDel(cctx, r.hash, fields...).Err()
}

// TryLock takes the cluster-wide eviction lock for ttl. ok is false while
// another replica holds it. If Redis cannot be reached it returns ok with
// an error: the caller may run its pass alone (degraded).
func (r *Redis) TryLock(ctx context.Context, ttl time.Duration) (unlock func(), ok bool, err error) {
	tok := make([]byte, 16)
	_, _ = rand.Read(tok)
	token := hex.EncodeToString(tok)
	cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	got, err := r.c.SetNX(cctx, r.lock, token, ttl).Result()
	cancel()
	if err != nil {
		r.failed(err)
		return func() {}, true, fmt.Errorf("recency: lock: %w", err)
	}
	if !got {
		return nil, false, nil
	}
	return func() {
		uctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		_ = r.unlock.Run(uctx, r.c, []string{r.lock}, token).Err()
	}, true, nil
}
