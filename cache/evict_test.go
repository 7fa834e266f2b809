package cache_test

import (
	"context"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/opencontainers/go-digest"

	"github.com/shoal-oci/shoal/cache"
	"github.com/shoal-oci/shoal/test/harness"
)

func layerDigest(t *testing.T, l v1.Layer) (digest.Digest, int64) {
	t.Helper()
	d, err := l.Digest()
	if err != nil {
		t.Fatal(err)
	}
	n, err := l.Size()
	if err != nil {
		t.Fatal(err)
	}
	return digest.Digest(d.String()), n
}

func configDigest(t *testing.T, img v1.Image) digest.Digest {
	t.Helper()
	d, err := img.ConfigName()
	if err != nil {
		t.Fatal(err)
	}
	return digest.Digest(d.String())
}

// TestEvictionKeepsReferencedBlobs: over --max-size, unreferenced blobs go
// first, least recently used first; a blob that a cached manifest of any
// repository references stays; when only referenced blobs remain, the least
// recently used manifest goes, and with it what only it referenced.
func TestEvictionKeepsReferencedBlobs(t *testing.T) {
	var max int64 = 1 << 40 // set below, once the sizes are known
	var c *cache.Cache
	f := newFixture(t, nil, func(cfg *cache.Config) { cfg.MaxSize = 1; cfg.EvictInterval = time.Hour })
	c = f.c
	ctx := context.Background()
	if err := c.Evict(ctx); err != nil {
		t.Fatalf("eviction on an empty cache: %v", err)
	}

	shared := harness.RandomLayer(t, 20_000)
	onlyA := harness.RandomLayer(t, 20_000)
	onlyB := harness.RandomLayer(t, 20_000)
	loose1 := harness.RandomLayer(t, 20_000) // fetched as blobs, never by a manifest
	loose2 := harness.RandomLayer(t, 20_000)
	imgA := harness.ImageWithLayers(t, shared, onlyA)
	imgB := harness.ImageWithLayers(t, shared, onlyB)
	f.hub.Push(t, "library/a", "v1", imgA)
	f.hub.Push(t, "library/b", "v1", imgB)
	f.hub.Push(t, "library/loose", "v1", harness.ImageWithLayers(t, loose1, loose2))

	get := func(repo, ref string, blob bool) {
		t.Helper()
		kind := "manifests"
		if blob {
			kind = "blobs"
		}
		if resp, _ := f.get(t, "GET", "/v2/"+repo+"/"+kind+"/"+ref); resp.StatusCode != 200 {
			t.Fatalf("GET %s %s: %d", repo, ref, resp.StatusCode)
		}
		f.settle() // the use is recorded before the clock moves on
	}
	dShared, nShared := layerDigest(t, shared)
	dA, nA := layerDigest(t, onlyA)
	dB, nB := layerDigest(t, onlyB)
	dL1, nL1 := layerDigest(t, loose1)
	dL2, nL2 := layerDigest(t, loose2)
	cfgA, cfgB := configDigest(t, imgA), configDigest(t, imgB)
	rawA, _ := imgA.RawConfigFile()
	rawB, _ := imgB.RawConfigFile()
	for _, img := range []struct {
		repo  string
		blobs []digest.Digest
	}{{"library/a", []digest.Digest{cfgA, dShared, dA}}, {"library/b", []digest.Digest{cfgB, dShared, dB}}} {
		get(img.repo, "v1", false)
		for _, d := range img.blobs {
			get(img.repo, d.String(), true)
		}
	}
	get("library/loose", dL2.String(), true)
	get("library/loose", dL1.String(), true)

	total := nShared + nA + nB + nL1 + nL2 + int64(len(rawA)) + int64(len(rawB))
	stored := func(d digest.Digest) bool {
		t.Helper()
		ok, err := cache.HasBlobForTest(ctx, c, d)
		if err != nil {
			t.Fatal(err)
		}
		return ok
	}
	// Fetches commit in the background, after the client's last byte: wait
	// for every commit, and the use it records, before the clock moves, so
	// the order below holds.
	deadline := time.Now().Add(5 * time.Second)
	for _, d := range []digest.Digest{dL1, dL2, dShared, dA, dB, cfgA, cfgB} {
		for !stored(d) {
			if time.Now().After(deadline) {
				t.Fatalf("%s not stored before eviction", d)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	dctx, cancel := context.WithDeadline(ctx, deadline)
	defer cancel()
	if err := cache.DrainForTest(dctx, c); err != nil {
		t.Fatal(err)
	}

	// loose2 is used before loose1, and A before B.
	f.clock.add(time.Minute)
	get("library/loose", dL2.String(), true)
	f.clock.add(10 * time.Minute)
	get("library/loose", dL1.String(), true)
	get("library/a", "v1", false)
	f.clock.add(time.Minute)
	get("library/b", "v1", false)
	f.clock.add(5 * time.Minute) // everything is past the grace for pulls in progress

	// 1. Room for all but one loose blob: the least recently used one goes.
	max = total - nL2/2
	evictWith(t, f, max)
	if stored(dL2) {
		t.Error("the least recently used unreferenced blob was kept")
	}
	for _, d := range []digest.Digest{dL1, dShared, dA, dB, cfgA, cfgB} {
		if !stored(d) {
			t.Errorf("%s was evicted although it was not needed to get under the bound", d)
		}
	}

	// 2. Room for less than the referenced content: loose1 goes, then
	// manifest A (least recently used) and what only A referenced. The shared
	// layer stays: B still references it.
	f.clock.add(5 * time.Minute)
	get("library/b", "v1", false) // B is the most recently used
	f.clock.add(5 * time.Minute)
	max = nShared + nB + int64(len(rawB)) + 1
	evictWith(t, f, max)
	for _, d := range []digest.Digest{dShared, dB, cfgB} {
		if !stored(d) {
			t.Errorf("%s, referenced by cached manifest library/b, was evicted", d)
		}
	}
	if stored(dA) || stored(cfgA) {
		t.Error("the blobs only the evicted manifest referenced were kept")
	}
	if stored(dL1) {
		t.Error("an unreferenced blob outlived a manifest eviction")
	}
}

// evictWith runs one eviction pass with bound max.
func evictWith(t *testing.T, f *fixture, max int64) {
	t.Helper()
	if err := cache.SetMaxSizeForTest(f.c, max); err != nil {
		t.Fatal(err)
	}
	if err := f.c.Evict(context.Background()); err != nil {
		t.Fatalf("evict: %v", err)
	}
}
