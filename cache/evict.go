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
)

// evictGrace protects content touched this recently: a pull in progress
// has fetched a manifest and is still fetching its layers.
const evictGrace = 2 * time.Minute

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
	mu    sync.Mutex
	used  map[digest.Digest]time.Time
}

// EvictShare is what replicas on shared storage share for eviction: when
// each digest was last used, by any replica, and a lock so that one pass
// runs at a time. *recency.Redis implements it.
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
}

// evictLockTTL bounds a pass's hold on the cross-replica lock.
const evictLockTTL = 10 * time.Minute

func newEvictor(st *store, max int64, log *slog.Logger, m *metrics, now func() time.Time, share EvictShare) *evictor {
	return &evictor{st: st, max: max, log: log, m: m, now: now, share: share, used: map[digest.Digest]time.Time{}}
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
	repo string
	d    digest.Digest
	refs []digest.Digest
	used time.Time
}

type cachedBlob struct {
	size int64
	used time.Time
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
	}
	blobs, total, err := e.blobs(ctx)
	if err != nil {
		return err
	}
	e.m.storage.Set(float64(total))
	if e.max <= 0 || total <= e.max {
		return nil
	}
	manifests, err := e.manifests(ctx)
	if err != nil {
		return err
	}
	e.shared(ctx, blobs, manifests)
	now := e.now()
	for total > e.max {
		refs := map[digest.Digest]bool{}
		for _, m := range manifests {
			for _, r := range m.refs {
				refs[r] = true
			}
		}
		// Unreferenced blobs, least recently used first.
		var free []digest.Digest
		for d, b := range blobs {
			if !refs[d] && now.Sub(b.used) > evictGrace {
				free = append(free, d)
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
		// Drop the least recently used manifest that no remaining index references.
		victim := -1
		for i, m := range manifests {
			if refs[m.d] || now.Sub(m.used) <= evictGrace {
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
		out[d] = cachedBlob{size: desc.Size, used: e.lastUse(d, mod)}
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
			cm.used = e.lastUse(d, mod)
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
	if err := e.st.deleteBlob(ctx, d); err != nil {
		return fmt.Errorf("unlink blob %s: %w", d, err)
	}
	if err := storage.NewVacuum(ctx, e.st.driver).RemoveBlob(d.String()); err != nil {
		return fmt.Errorf("remove blob %s: %w", d, err)
	}
	e.m.evicted.Inc()
	e.log.InfoContext(ctx, "evicted blob", "digest", d)
	if e.share != nil {
		_ = e.share.Forget(ctx, d)
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
	if err := ms.Delete(ctx, m.d); err != nil {
		return fmt.Errorf("delete manifest %s@%s: %w", m.repo, m.d, err)
	}
	e.log.InfoContext(ctx, "evicted manifest", "repo", m.repo, "digest", m.d)
	return nil
}

// isPathNotFound reports a storage path that does not exist (yet).
func isPathNotFound(err error) bool {
	var pnf storagedriver.PathNotFoundError
	return errors.As(err, &pnf)
}
