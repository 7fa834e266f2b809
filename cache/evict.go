package cache

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sort"
	"sync"
	"time"

	"github.com/distribution/distribution/v3"
	"github.com/distribution/distribution/v3/registry/storage"
	storagedriver "github.com/distribution/distribution/v3/registry/storage/driver"
	"github.com/distribution/reference"
	"github.com/opencontainers/go-digest"

	"github.com/shoal-oci/shoal/cache/recency"
)

// DefaultEvictGrace is Config.EvictGrace's default.
const DefaultEvictGrace = 2 * time.Minute

// evictor keeps stored blobs under a size bound, least recently used first.
// A blob referenced by any cached manifest of any repository is never
// removed; when only referenced blobs remain, the least recently used
// manifest goes first, and with it whatever only it referenced.
type evictor struct {
	st    *store
	max   int64
	log   *slog.Logger
	m     *metrics
	now   func() time.Time
	share EvictShare // nil: this replica's view only
	grace time.Duration
	mu    sync.Mutex
	used  map[digest.Digest]time.Time
}

// EvictShare is what replicas on shared storage share for eviction: when
// each digest was last used, by any replica, a lock so that one pass runs
// at a time, and an inventory of what the storage holds, so that a pass
// need not list the storage. *recency.Redis implements it.
type EvictShare interface {
	// Touch records a use; it must not block.
	Touch(d digest.Digest, t time.Time)
	// LastUse returns the latest recorded use of each of ds.
	LastUse(ctx context.Context, ds []digest.Digest) (map[digest.Digest]time.Time, error)
	// Forget drops the records of evicted digests.
	Forget(ctx context.Context, ds ...digest.Digest) error
	// TryLock takes the eviction lock for ttl; ok is false while another
	// replica holds it. An error with ok means: run alone (degraded).
	TryLock(ctx context.Context, ttl time.Duration) (unlock func(), ok bool, err error)

	// AddBlob and AddManifest record what a replica stored; they must not
	// block.
	AddBlob(d digest.Digest, size int64, at time.Time)
	AddManifest(repo string, d digest.Digest, refs []digest.Digest, at time.Time)
	// Total is the inventory's stored bytes; complete is false when the
	// inventory must be rebuilt by a walk (Replace).
	Total(ctx context.Context) (total int64, complete bool, err error)
	// Load reads the whole inventory.
	Load(ctx context.Context) (map[digest.Digest]recency.InvBlob, []recency.InvManifest, error)
	// Replace merges a walk that started at started into the inventory.
	Replace(ctx context.Context, started time.Time, blobs map[digest.Digest]recency.InvBlob, manifests []recency.InvManifest) error
	// RemoveBlob and RemoveManifest drop what the pass evicted.
	RemoveBlob(ctx context.Context, d digest.Digest) error
	RemoveManifest(ctx context.Context, repo string, d digest.Digest) error
}

// evictLockTTL bounds a pass's hold on the cross-replica lock.
const evictLockTTL = 10 * time.Minute

func newEvictor(st *store, max int64, grace time.Duration, log *slog.Logger, m *metrics, now func() time.Time, share EvictShare) *evictor {
	return &evictor{st: st, max: max, grace: grace, log: log, m: m, now: now, share: share, used: map[digest.Digest]time.Time{}}
}

// touch records that d (a blob or manifest) was served.
func (e *evictor) touch(d digest.Digest) {
	if e.max <= 0 {
		return
	}
	now := e.now()
	e.mu.Lock()
	e.used[d] = now
	e.mu.Unlock()
	if e.share != nil {
		e.share.Touch(d, now)
	}
}

// blobStored records a blob this replica stored.
func (e *evictor) blobStored(d digest.Digest, size int64) {
	e.touch(d)
	if e.share != nil && e.max > 0 {
		e.share.AddBlob(d, size, e.now())
	}
}

// manifestStored records a manifest this replica stored, under its storage
// repository name, with the digests it references.
func (e *evictor) manifestStored(repo string, d digest.Digest, refs []digest.Digest) {
	e.touch(d)
	if e.share != nil && e.max > 0 {
		e.share.AddManifest(repo, d, refs, e.now())
	}
}

// hold keeps d recent while a response serves it, so that no replica's pass
// evicts a blob in the middle of a long download; stop ends it.
func (e *evictor) hold(d digest.Digest) (stop func()) {
	e.touch(d)
	if e.max <= 0 {
		return func() {}
	}
	done := make(chan struct{})
	go func() {
		t := time.NewTicker(e.grace / 4)
		defer t.Stop()
		for {
			select {
			case <-done:
				return
			case <-t.C:
				e.touch(d)
			}
		}
	}()
	// The last use is the response's end, recorded before the handler
	// returns, not later on another goroutine.
	return func() { close(done); e.touch(d) }
}

// shared raises each known use to the latest any replica recorded. If the
// share cannot be read, the pass goes on with this replica's view.
func (e *evictor) shared(ctx context.Context, blobs map[digest.Digest]cachedBlob, manifests []cachedManifest) {
	if e.share == nil {
		return
	}
	ds := make([]digest.Digest, 0, len(blobs)+len(manifests))
	for d := range blobs {
		ds = append(ds, d)
	}
	for _, m := range manifests {
		ds = append(ds, m.d)
	}
	uses, err := e.share.LastUse(ctx, ds)
	if err != nil {
		e.log.WarnContext(ctx, "eviction: other replicas' recency unavailable; using this replica's", "err", err)
		return
	}
	for d, b := range blobs {
		if t, ok := uses[d]; ok && t.After(b.used) {
			b.used = t
			blobs[d] = b
		}
	}
	for i, m := range manifests {
		if t, ok := uses[m.d]; ok && t.After(m.used) {
			manifests[i].used = t
		}
	}
}

func (e *evictor) lastUse(d digest.Digest, fallback time.Time) time.Time {
	e.mu.Lock()
	defer e.mu.Unlock()
	if t, ok := e.used[d]; ok && t.After(fallback) {
		return t
	}
	return fallback
}

type cachedManifest struct {
	repo   string
	d      digest.Digest
	refs   []digest.Digest
	stored time.Time
	used   time.Time
}

type cachedBlob struct {
	size   int64
	stored time.Time
	used   time.Time
}

// run is one eviction pass; with a share, one at a time across replicas.
func (e *evictor) run(ctx context.Context) error {
	if e.share != nil && e.max > 0 {
		unlock, ok, err := e.share.TryLock(ctx, evictLockTTL)
		if err != nil {
			e.log.WarnContext(ctx, "eviction lock unavailable; this replica runs its pass alone", "err", err)
		}
		if !ok {
			e.log.DebugContext(ctx, "another replica runs the eviction pass")
			return nil
		}
		defer unlock()
		if err == nil {
			return e.runShared(ctx)
		}
	}
	return e.runWalk(ctx)
}

// runWalk is a pass that lists the storage: without a share, or when the
// share is unreachable.
func (e *evictor) runWalk(ctx context.Context) error {
	blobs, total, err := e.blobs(ctx)
	if err != nil {
		return err
	}
	e.m.evictWalks.Inc()
	e.m.storage.Set(float64(total))
	if e.max <= 0 || total <= e.max {
		return nil
	}
	manifests, err := e.manifests(ctx)
	if err != nil {
		return err
	}
	e.shared(ctx, blobs, manifests)
	return e.evict(ctx, blobs, manifests, total)
}

// runShared is a pass on the shared inventory: one counter read when under
// the bound, the inventory (not the storage) when over. Only a missing or
// expired inventory costs a walk, which rebuilds it.
func (e *evictor) runShared(ctx context.Context) error {
	total, complete, err := e.share.Total(ctx)
	if err != nil {
		e.log.WarnContext(ctx, "eviction: shared inventory unavailable; listing the storage", "err", err)
		return e.runWalk(ctx)
	}
	var blobs map[digest.Digest]cachedBlob
	var manifests []cachedManifest
	if !complete {
		started := e.now()
		if blobs, total, err = e.blobs(ctx); err != nil {
			return err
		}
		if manifests, err = e.manifests(ctx); err != nil {
			return err
		}
		e.m.evictWalks.Inc()
		inv := make(map[digest.Digest]recency.InvBlob, len(blobs))
		for d, b := range blobs {
			inv[d] = recency.InvBlob{Size: b.size, Stored: b.stored}
		}
		invM := make([]recency.InvManifest, len(manifests))
		for i, m := range manifests {
			invM[i] = recency.InvManifest{Repo: m.repo, D: m.d, Refs: m.refs, Stored: m.stored}
		}
		if err := e.share.Replace(ctx, started, inv, invM); err != nil {
			e.log.WarnContext(ctx, "eviction: shared inventory not rebuilt; the next pass walks again", "err", err)
		}
	}
	e.m.storage.Set(float64(total))
	if total <= e.max {
		return nil
	}
	if complete {
		inv, invM, err := e.share.Load(ctx)
		if err != nil {
			return err
		}
		blobs = make(map[digest.Digest]cachedBlob, len(inv))
		for d, b := range inv {
			blobs[d] = cachedBlob{size: b.Size, stored: b.Stored, used: e.lastUse(d, b.Stored)}
		}
		for _, m := range invM {
			manifests = append(manifests, cachedManifest{repo: m.Repo, d: m.D, refs: m.Refs, used: e.lastUse(m.D, time.Time{})})
		}
	}
	e.shared(ctx, blobs, manifests)
	return e.evict(ctx, blobs, manifests, total)
}

// evict removes unreferenced blobs, least recently used first, then the
// least recently used manifests, until total is under the bound.
func (e *evictor) evict(ctx context.Context, blobs map[digest.Digest]cachedBlob, manifests []cachedManifest, total int64) error {
	now := e.now()
	for total > e.max {
		refs := map[digest.Digest]bool{}
		cached := map[digest.Digest]bool{} // manifests' own bytes are blobs too
		for _, m := range manifests {
			cached[m.d] = true
			for _, r := range m.refs {
				refs[r] = true
			}
		}
		// Unreferenced blobs, least recently used first.
		var free []digest.Digest
		soon := false // unreferenced blobs used within the grace: free by a later pass
		for d, b := range blobs {
			if refs[d] || cached[d] {
				continue
			}
			if now.Sub(b.used) > e.grace {
				free = append(free, d)
			} else {
				soon = true
			}
		}
		sort.Slice(free, func(i, j int) bool { return blobs[free[i]].used.Before(blobs[free[j]].used) })
		for _, d := range free {
			if total <= e.max {
				break
			}
			if err := e.removeBlob(ctx, d); err != nil {
				return err
			}
			total -= blobs[d].size
			delete(blobs, d)
		}
		if total <= e.max {
			break
		}
		if soon {
			// A cached manifest is worth more than a blob nothing
			// references: wait for those to leave their grace.
			e.log.DebugContext(ctx, "over the size bound; unreferenced blobs are still in their grace", "total", total, "max", e.max)
			break
		}
		// Drop the least recently used manifest that no remaining index references.
		victim := -1
		for i, m := range manifests {
			if refs[m.d] || now.Sub(m.used) <= e.grace {
				continue
			}
			if victim < 0 || m.used.Before(manifests[victim].used) {
				victim = i
			}
		}
		if victim < 0 {
			e.log.WarnContext(ctx, "cache is over its size bound but everything left is in use", "total", total, "max", e.max)
			break
		}
		m := manifests[victim]
		if err := e.removeManifest(ctx, m); err != nil {
			return err
		}
		manifests = append(manifests[:victim], manifests[victim+1:]...)
	}
	e.m.storage.Set(float64(total))
	return nil
}

func (e *evictor) blobs(ctx context.Context) (map[digest.Digest]cachedBlob, int64, error) {
	out := map[digest.Digest]cachedBlob{}
	var total int64
	en, ok := e.st.blobs.(distribution.BlobEnumerator)
	if !ok {
		return nil, 0, fmt.Errorf("blob store cannot enumerate")
	}
	err := en.Enumerate(ctx, func(d digest.Digest) error {
		desc, ok, err := e.st.statBlob(ctx, d)
		if err != nil || !ok {
			return err
		}
		var mod time.Time
		if fi, err := e.st.driver.Stat(ctx, blobDataPath(d)); err == nil {
			mod = fi.ModTime()
		}
		out[d] = cachedBlob{size: desc.Size, stored: mod, used: e.lastUse(d, mod)}
		total += desc.Size
		return nil
	})
	if err != nil && !isPathNotFound(err) { // nothing stored yet
		return nil, 0, fmt.Errorf("enumerate blobs: %w", err)
	}
	return out, total, nil
}

// blobDataPath is distribution's path for a blob's bytes.
func blobDataPath(d digest.Digest) string {
	h := d.Encoded()
	return fmt.Sprintf("/docker/registry/v2/blobs/%s/%s/%s/data", d.Algorithm(), h[:2], h)
}

func (e *evictor) manifests(ctx context.Context) ([]cachedManifest, error) {
	en, ok := e.st.ns.(distribution.RepositoryEnumerator)
	if !ok {
		return nil, fmt.Errorf("storage cannot enumerate repositories")
	}
	var out []cachedManifest
	err := en.Enumerate(ctx, func(name string) error {
		if name == blobRepo {
			return nil
		}
		named, err := reference.WithName(name)
		if err != nil {
			return nil
		}
		repo, err := e.st.ns.Repository(ctx, named)
		if err != nil {
			return err
		}
		ms, err := repo.Manifests(ctx, storage.SkipLayerVerification())
		if err != nil {
			return err
		}
		men, ok := ms.(distribution.ManifestEnumerator)
		if !ok {
			return nil
		}
		return men.Enumerate(ctx, func(d digest.Digest) error {
			m, err := ms.Get(ctx, d)
			if err != nil {
				return nil // unreadable: leave it to distribution's own GC
			}
			cm := cachedManifest{repo: name, d: d}
			for _, r := range m.References() {
				cm.refs = append(cm.refs, r.Digest)
			}
			var mod time.Time
			if fi, err := e.st.driver.Stat(ctx, blobDataPath(d)); err == nil {
				mod = fi.ModTime()
			}
			cm.stored, cm.used = mod, e.lastUse(d, mod)
			out = append(out, cm)
			return nil
		})
	})
	if err != nil && !isPathNotFound(err) {
		return nil, fmt.Errorf("enumerate manifests: %w", err)
	}
	return out, nil
}

func (e *evictor) removeBlob(ctx context.Context, d digest.Digest) error {
	switch err := e.st.deleteBlob(ctx, d); {
	case errors.Is(err, distribution.ErrBlobUnknown) || isPathNotFound(err):
		// Gone already (removed outside shoal): only the records remain.
		e.log.InfoContext(ctx, "evicted blob was already gone from storage", "digest", d)
	case err != nil:
		return fmt.Errorf("unlink blob %s: %w", d, err)
	default:
		if err := storage.NewVacuum(ctx, e.st.driver).RemoveBlob(d.String()); err != nil && !isPathNotFound(err) {
			return fmt.Errorf("remove blob %s: %w", d, err)
		}
		e.m.evicted.Inc()
		e.log.InfoContext(ctx, "evicted blob", "digest", d)
	}
	if e.share != nil {
		_ = e.share.Forget(ctx, d)
		if err := e.share.RemoveBlob(ctx, d); err != nil {
			e.log.WarnContext(ctx, "evicted blob stays in the shared inventory until its next rebuild", "digest", d, "err", err)
		}
	}
	return nil
}

func (e *evictor) removeManifest(ctx context.Context, m cachedManifest) error {
	named, err := reference.WithName(m.repo)
	if err != nil {
		return err
	}
	repo, err := e.st.ns.Repository(ctx, named)
	if err != nil {
		return err
	}
	ms, err := repo.Manifests(ctx)
	if err != nil {
		return err
	}
	if err := ms.Delete(ctx, m.d); err != nil && !isPathNotFound(err) && !errors.As(err, new(distribution.ErrManifestUnknownRevision)) {
		return fmt.Errorf("delete manifest %s@%s: %w", m.repo, m.d, err)
	}
	e.log.InfoContext(ctx, "evicted manifest", "repo", m.repo, "digest", m.d)
	if e.share != nil {
		if err := e.share.RemoveManifest(ctx, m.repo, m.d); err != nil {
			e.log.WarnContext(ctx, "evicted manifest stays in the shared inventory until its next rebuild", "digest", m.d, "err", err)
		}
	}
	return nil
}

// isPathNotFound reports a storage path that does not exist (yet).
func isPathNotFound(err error) bool {
	var pnf storagedriver.PathNotFoundError
	return errors.As(err, &pnf)
}
