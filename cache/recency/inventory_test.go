package recency

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/shoal-oci/shoal/test/harness"
)

// TestReplaceKeepsWhatWasStoredDuringTheWalk: a walk that started before a
// replica stored a manifest does not find it, and Replace keeps it (else
// its blobs would pass for unreferenced); a manifest stored before the walk
// that the walk did not find is dropped, in the old value format too.
func TestReplaceKeepsWhatWasStoredDuringTheWalk(t *testing.T) {
	rdb := harness.RedisClient(t, harness.StartRedis(t))
	ctx := context.Background()
	r := NewRedis(rdb, "t:evict:", nil, nil)
	started := time.Now()
	dM, dC, dL := digest.FromString("manifest"), digest.FromString("config"), digest.FromString("layer")
	gone, legacy := digest.FromString("gone"), digest.FromString("legacy")
	r.AddManifest("docker.io/library/gone", gone, []digest.Digest{dC}, started.Add(-time.Hour))
	r.AddManifest("docker.io/library/a", dM, []digest.Digest{dC, dL}, started.Add(time.Second))
	r.AddBlob(dL, 10, started.Add(time.Second))
	if err := r.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	// A value written before manifests had a stored time.
	if err := rdb.HSet(ctx, "t:evict:inv:manifests", "docker.io/library/legacy@"+legacy.String(), dC.String()).Err(); err != nil {
		t.Fatal(err)
	}
	if _, ms, err := r.Load(ctx); err != nil || len(ms) != 3 {
		t.Fatalf("before the walk: %d manifests, %v; want 3", len(ms), err)
	}
	if err := r.Replace(ctx, started, map[digest.Digest]InvBlob{}, nil); err != nil {
		t.Fatal(err)
	}
	blobs, ms, err := r.Load(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(ms) != 1 || ms[0].D != dM || len(ms[0].Refs) != 2 || ms[0].Refs[1] != dL || ms[0].Stored.UnixMilli() != started.Add(time.Second).UnixMilli() {
		t.Fatalf("after the walk: manifests %+v, want only the one stored during it", ms)
	}
	if _, ok := blobs[dL]; !ok {
		t.Fatalf("after the walk: blobs %v, want the one stored during it", blobs)
	}
	if total, complete, err := r.Total(ctx); err != nil || !complete || total != 10 {
		t.Fatalf("total %d complete %v err %v; want 10 true", total, complete, err)
	}
}

// TestInventoryBufferBounded: a replica that buffers more inventory changes
// than it may (Redis has not taken them) drops them and marks the inventory
// incomplete once, so the next pass walks. A walk that started before the
// drop leaves it incomplete, whichever replica ran it; one that started
// after completes it, and the replica that dropped does not undo that.
func TestInventoryBufferBounded(t *testing.T) {
	rdb := harness.RedisClient(t, harness.StartRedis(t))
	ctx := context.Background()
	a := NewRedis(rdb, "t:evict:", nil, nil)
	b := NewRedis(rdb, "t:evict:", nil, nil) // the replica that walks
	a.maxInv = 4
	complete := func(r *Redis, want bool, when string) {
		t.Helper()
		if _, got, err := r.Total(ctx); err != nil || got != want {
			t.Fatalf("%s: complete %v, %v; want %v", when, got, err, want)
		}
	}
	before := time.Now()
	if err := b.Replace(ctx, before, map[digest.Digest]InvBlob{}, nil); err != nil {
		t.Fatal(err)
	}
	complete(a, true, "after a walk")
	for i := range 6 {
		a.AddBlob(digest.FromString(fmt.Sprint(i)), 1, time.Now())
	}
	a.mu.Lock()
	n := len(a.pendingInv)
	a.mu.Unlock()
	if n > 4 {
		t.Fatalf("%d changes buffered, want at most 4", n)
	}
	complete(a, false, "after dropping buffered changes")
	// A walk that started before the drop may have missed what was dropped.
	if err := b.Replace(ctx, before, map[digest.Digest]InvBlob{}, nil); err != nil {
		t.Fatal(err)
	}
	complete(b, false, "after another replica's walk older than the drop")
	if err := b.Replace(ctx, time.Now(), map[digest.Digest]InvBlob{}, nil); err != nil {
		t.Fatal(err)
	}
	complete(b, true, "after a walk newer than the drop")
	complete(a, true, "after the dropping replica flushed again")
}
