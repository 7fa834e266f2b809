package recency

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/opencontainers/go-digest"
	"github.com/redis/go-redis/v9"
)

// The inventory is the replicas' shared record of what the storage holds:
// every stored blob with its size and when it was stored, every stored
// manifest with what it references, and their total size. Replicas add to
// it as they store; the eviction pass removes what it evicts. So a pass
// reads one counter when the cache is under its bound, and the inventory,
// not the object store, when it is over: a pass costs O(changes), not a walk
// of every stored blob. A full walk rebuilds it when it is missing (a new
// Redis, a failover that lost it) and once per RebuildInterval, to take in
// anything a crashed replica stored but never recorded.

// RebuildInterval is how long a complete inventory is trusted before the
// next pass walks the storage again.
const RebuildInterval = 24 * time.Hour

// InvBlob is a stored blob as the inventory records it.
type InvBlob struct {
	Size   int64
	Stored time.Time
}

// InvManifest is a stored manifest: its storage repository, digest, the
// digests it references, and when it was stored.
type InvManifest struct {
	Repo   string
	D      digest.Digest
	Refs   []digest.Digest
	Stored time.Time
}

// invOp is one buffered inventory change: a stored blob or manifest.
type invOp struct {
	blob bool
	d    digest.Digest
	size int64
	at   time.Time
	repo string
	refs []digest.Digest
}

// maxPendingInv is how many inventory changes a replica buffers while it
// cannot write them (a few MiB). Past it the buffer is dropped and the
// inventory marked incomplete, so the next eviction pass walks the storage
// and rebuilds it: nothing stored is lost from the count, it costs a walk.
const maxPendingInv = 1 << 16

func (r *Redis) invKey(s string) string { return r.inv + s }

// AddBlob records a stored blob. It never blocks on Redis: it is written
// with the next flush.
func (r *Redis) AddBlob(d digest.Digest, size int64, at time.Time) {
	r.addInv(invOp{blob: true, d: d, size: size, at: at})
}

// AddManifest records a manifest stored at at, and its references;
// written with the next flush.
func (r *Redis) AddManifest(repo string, d digest.Digest, refs []digest.Digest, at time.Time) {
	r.addInv(invOp{repo: repo, d: d, refs: refs, at: at})
}

// addInv buffers op, dropping the buffer when it is full.
func (r *Redis) addInv(op invOp) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.pendingInv) >= r.maxInv {
		r.log.Warn("inventory changes dropped: Redis has not taken them for too long; the next eviction pass rebuilds the inventory from storage", "dropped", len(r.pendingInv))
		r.pendingInv = nil
		r.invDropped = time.Now()
	}
	r.pendingInv = append(r.pendingInv, op)
}

func manifestField(repo string, d digest.Digest) string { return repo + "@" + d.String() }

// manifestValue is a manifest's inventory value: "<stored ms>|<refs>",
// the references comma-separated.
func manifestValue(refs []digest.Digest, stored time.Time) string {
	s := make([]string, len(refs))
	for i, d := range refs {
		s[i] = d.String()
	}
	return strconv.FormatInt(stored.UnixMilli(), 10) + "|" + strings.Join(s, ",")
}

// flushInv writes the buffered inventory changes; on failure they stay
// buffered.
func (r *Redis) flushInv(ctx context.Context) error {
	r.mu.Lock()
	ops := r.pendingInv
	r.pendingInv = nil
	dropped := r.invDropped
	r.invDropped = time.Time{}
	r.mu.Unlock()
	if len(ops) == 0 && dropped.IsZero() {
		return nil
	}
	cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	pipe := r.c.Pipeline()
	if !dropped.IsZero() {
		// The inventory no longer holds all that is stored: the next pass
		// must walk, and a walk that started before the drop, on any
		// replica, may not complete it (markComplete).
		pipe.Del(cctx, r.invKey("complete"))
		r.setMax.Eval(cctx, pipe, []string{r.invKey("dropped")}, "at", dropped.UnixMicro())
	}
	for _, op := range ops {
		if op.blob {
			r.addBlob.Eval(cctx, pipe, []string{r.invKey("blobs"), r.invKey("total")}, op.d.String(), op.size, op.at.UnixMilli())
		} else {
			pipe.HSet(cctx, r.invKey("manifests"), manifestField(op.repo, op.d), manifestValue(op.refs, op.at))
		}
	}
	if _, err := pipe.Exec(cctx); err != nil {
		r.mu.Lock()
		r.pendingInv = append(ops, r.pendingInv...)
		if r.invDropped.IsZero() {
			r.invDropped = dropped
		}
		r.mu.Unlock()
		r.failed(err)
		return fmt.Errorf("inventory: flush: %w", err)
	}
	return nil
}

// Total returns the stored bytes the inventory counts, and whether the
// inventory is complete (built by a walk within RebuildInterval). It
// flushes this replica's buffer first.
func (r *Redis) Total(ctx context.Context) (total int64, complete bool, err error) {
	if err := r.Flush(ctx); err != nil {
		return 0, false, err
	}
	cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	pipe := r.c.Pipeline()
	ex := pipe.Exists(cctx, r.invKey("complete"))
	tot := pipe.Get(cctx, r.invKey("total"))
	if _, err := pipe.Exec(cctx); err != nil && err != redis.Nil {
		r.failed(err)
		return 0, false, fmt.Errorf("inventory: read total: %w", err)
	}
	if ex.Val() == 0 {
		return 0, false, nil
	}
	total, _ = strconv.ParseInt(tot.Val(), 10, 64)
	return total, true, nil
}

// Load returns the whole inventory (read from Redis in pages).
func (r *Redis) Load(ctx context.Context) (map[digest.Digest]InvBlob, []InvManifest, error) {
	blobs := map[digest.Digest]InvBlob{}
	err := r.scan(ctx, r.invKey("blobs"), func(k, v string) {
		d, err := digest.Parse(k)
		if err != nil {
			return
		}
		size, at, _ := strings.Cut(v, ":")
		n, err := strconv.ParseInt(size, 10, 64)
		if err != nil {
			return
		}
		ms, _ := strconv.ParseInt(at, 10, 64)
		blobs[d] = InvBlob{Size: n, Stored: time.UnixMilli(ms)}
	})
	if err != nil {
		return nil, nil, err
	}
	var manifests []InvManifest
	err = r.scan(ctx, r.invKey("manifests"), func(k, v string) {
		i := strings.LastIndex(k, "@")
		if i < 0 {
			return
		}
		d, err := digest.Parse(k[i+1:])
		if err != nil {
			return
		}
		m := InvManifest{Repo: k[:i], D: d}
		if ms, refs, ok := strings.Cut(v, "|"); ok {
			n, _ := strconv.ParseInt(ms, 10, 64)
			m.Stored, v = time.UnixMilli(n), refs
		}
		for _, s := range strings.Split(v, ",") {
			if rd, err := digest.Parse(s); err == nil {
				m.Refs = append(m.Refs, rd)
			}
		}
		manifests = append(manifests, m)
	})
	if err != nil {
		return nil, nil, err
	}
	return blobs, manifests, nil
}

func (r *Redis) scan(ctx context.Context, key string, f func(k, v string)) error {
	var cursor uint64
	for {
		cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		kv, next, err := r.c.HScan(cctx, key, cursor, "", 1000).Result()
		cancel()
		if err != nil {
			r.failed(err)
			return fmt.Errorf("inventory: read %s: %w", key, err)
		}
		for i := 0; i+1 < len(kv); i += 2 {
			f(kv[i], kv[i+1])
		}
		if next == 0 {
			return nil
		}
		cursor = next
	}
}

// Replace merges what a full walk of the storage found into the inventory,
// drops what the walk did not find, recounts the total, and marks the
// inventory complete for RebuildInterval. Changes recorded during the walk
// are kept: only entries older than the walk's start are dropped.
func (r *Redis) Replace(ctx context.Context, started time.Time, blobs map[digest.Digest]InvBlob, manifests []InvManifest) error {
	if err := r.Flush(ctx); err != nil {
		return err
	}
	old, oldManifests, err := r.Load(ctx)
	if err != nil {
		return err
	}
	cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	pipe := r.c.Pipeline()
	for d, b := range old {
		if _, ok := blobs[d]; !ok && b.Stored.Before(started) {
			pipe.HDel(cctx, r.invKey("blobs"), d.String())
		}
	}
	found := map[string]bool{}
	for _, m := range manifests {
		found[manifestField(m.Repo, m.D)] = true
	}
	for _, m := range oldManifests {
		// A manifest stored during the walk may be missing from it: keep
		// it, or a pass would take its blobs for unreferenced.
		if f := manifestField(m.Repo, m.D); !found[f] && m.Stored.Before(started) {
			pipe.HDel(cctx, r.invKey("manifests"), f)
		}
	}
	for d, b := range blobs {
		pipe.HSetNX(cctx, r.invKey("blobs"), d.String(), fmt.Sprintf("%d:%d", b.Size, b.Stored.UnixMilli()))
	}
	for _, m := range manifests {
		pipe.HSetNX(cctx, r.invKey("manifests"), manifestField(m.Repo, m.D), manifestValue(m.Refs, m.Stored))
	}
	r.recount.Eval(cctx, pipe, []string{r.invKey("blobs"), r.invKey("total")})
	// Changes a replica dropped after the walk started may be missing from
	// both: then it stays incomplete, and the next pass walks again.
	r.markComplete.Eval(cctx, pipe, []string{r.invKey("complete"), r.invKey("dropped")},
		started.UnixMicro(), started.UnixMilli(), RebuildInterval.Milliseconds())
	if _, err := pipe.Exec(cctx); err != nil {
		r.failed(err)
		return fmt.Errorf("inventory: replace: %w", err)
	}
	return nil
}

// RemoveBlob drops an evicted blob from the inventory and its size from
// the total.
func (r *Redis) RemoveBlob(ctx context.Context, d digest.Digest) error {
	cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	if err := r.removeBlob.Run(cctx, r.c, []string{r.invKey("blobs"), r.invKey("total")}, d.String()).Err(); err != nil {
		r.failed(err)
		return fmt.Errorf("inventory: remove blob %s: %w", d, err)
	}
	return nil
}

// RemoveManifest drops an evicted manifest from the inventory.
func (r *Redis) RemoveManifest(ctx context.Context, repo string, d digest.Digest) error {
	cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	if err := r.c.HDel(cctx, r.invKey("manifests"), manifestField(repo, d)).Err(); err != nil {
		r.failed(err)
		return fmt.Errorf("inventory: remove manifest %s: %w", d, err)
	}
	return nil
}
