package cache_e2e

import (
	"context"
	"fmt"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/shoal-oci/shoal/test/harness"
	"github.com/shoal-oci/shoal/test/hub"
)

// TestConcurrentColdPullsFetchOnce: 32 concurrent cold pulls of one image,
// spread over two cache replicas that share storage and Redis, cost exactly
// one upstream fetch per blob, and every client gets byte-identical content.
// Real clients (crane, regctl, oras) send no ?ns= and reach the hub as the
// cache's docker.io; go-containerregistry clients send ?ns=<hub>, so the
// blob dedup also holds across registry names.
func TestConcurrentColdPullsFetchOnce(t *testing.T) {
	h := hub.Start(t)
	img := harness.RandomImage(t, 3, 1<<20)
	md := h.Push(t, "library/app", "v1", img)
	want := imageContent(t, img)
	redisURL := harness.StartRedis(t)
	shared := filepath.Join(t.TempDir(), "registry")
	var replicas []*cacheProc
	for _, n := range []string{"r1", "r2"} {
		replicas = append(replicas, startCache(t, h, cacheOpts{
			name:      n,
			upstreams: []string{h.Host() + "=" + h.URL(), "docker.io=" + h.URL()},
			args: []string{"--storage", "filesystem", "--storage-opt", "rootdirectory=" + shared,
				"--redis-url", redisURL},
		}))
	}
	clis := []string{"crane", "regctl", "oras"}
	for _, tool := range clis {
		// Skips (or fails in CI) before any pull if a client is missing.
		_ = harness.Binary(t, "SHOAL_"+map[string]string{"crane": "CRANE", "regctl": "REGCTL", "oras": "ORAS"}[tool]+"_BIN", tool)
	}
	h.ResetCounts()
	h.SetBandwidth(1 << 20) // each layer takes about a second: the pulls overlap

	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	const clients = 32
	errs := make([]error, clients)
	var wg sync.WaitGroup
	for i := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c := replicas[i%2]
			switch {
			case i < 2*len(clis): // two of each real client, one on each replica
				errs[i] = cliPull(t, ctx, clis[i/2], c.addr, "library/app", "v1", want)
			case i%2 == 0:
				got, err := ggcrPull(ctx, c.addr, "library/app", "v1", h.Host())
				if err == nil {
					err = want.same(got)
				}
				errs[i] = err
			default:
				got, err := ggcrPull(ctx, c.addr, "library/app", "v1", "")
				if err == nil {
					err = want.same(got)
				}
				errs[i] = err
			}
		}()
	}
	wg.Wait()
	h.SetBandwidth(0)
	for i, err := range errs {
		if err != nil {
			t.Errorf("client %d (replica %s): %v", i, replicas[i%2].name, err)
		}
	}
	for d := range want {
		if d == md {
			continue
		}
		if n := h.BlobGETs(d); n != 1 {
			t.Errorf("blob %s: %d upstream GETs, want exactly 1", d, n)
		}
	}
	// The manifest is cached per registry name (the hub's own and docker.io):
	// at most one counted GET for each.
	if n := h.Counts().ManifestGET; n < 1 || n > 2 {
		t.Errorf("counted manifest GETs = %d, want 1 per registry name (<= 2)", n)
	}
	var deduped float64
	for _, c := range replicas {
		deduped += c.metric(t, "shoal_flight_deduplicated_total")
	}
	// 32 clients, one fetch per digest: every other caller joined a flight
	// in progress or found it committed by another replica.
	if deduped < 1 {
		t.Errorf("shoal_flight_deduplicated_total over the replicas = %v: no caller shared a fetch (hub %+v)", deduped, h.Counts())
	}
}

// TestWarmTagPullsCostNothingAndRetagIsSeen: 100 pulls of a cached,
// unchanged tag cost 0 counted upstream requests (HEADs only past the
// freshness window); after an upstream re-tag the next pull past the window
// gets the new digest.
func TestWarmTagPullsCostNothingAndRetagIsSeen(t *testing.T) {
	h := hub.Start(t)
	img := harness.RandomImage(t, 2, 4096)
	md := h.Push(t, "library/app", "v1", img)
	want := imageContent(t, img)
	const freshness = 2 * time.Second
	c := startCache(t, h, cacheOpts{args: []string{"--tag-freshness", freshness.String()}})
	ctx := context.Background()
	got, err := ggcrPull(ctx, c.addr, "library/app", "v1", h.Host())
	if err != nil {
		t.Fatal(err)
	}
	if err := want.same(got); err != nil {
		t.Fatal(err)
	}
	before := h.Counts()
	start := time.Now()
	for i := range 100 {
		// A pull: the tag, then the config and every layer.
		resp, body := do(t, "GET", nsURL(c.url(), "/v2/library/app/manifests/v1", h.Host()),
			"Accept", "application/vnd.oci.image.manifest.v1+json")
		if resp.StatusCode != 200 || digest.FromBytes(body) != md {
			t.Fatalf("pull %d: manifest %d %s", i, resp.StatusCode, digest.FromBytes(body))
		}
		for d, b := range want {
			if d == md {
				continue
			}
			resp, body := do(t, "GET", nsURL(c.url(), "/v2/library/app/blobs/"+d.String(), h.Host()))
			if resp.StatusCode != 200 || string(body) != string(b) {
				t.Fatalf("pull %d: blob %s: %d, %d bytes", i, d, resp.StatusCode, len(body))
			}
		}
	}
	elapsed := time.Since(start)
	after := h.Counts()
	if after.ManifestGET != before.ManifestGET || after.BlobGET != before.BlobGET || after.Throttled != before.Throttled {
		t.Fatalf("warm pulls cost counted upstream requests: %+v -> %+v", before, after)
	}
	// Free HEADs only once per elapsed freshness window.
	if heads, allowed := after.ManifestHEAD-before.ManifestHEAD, int64(elapsed/freshness)+1; heads > allowed {
		t.Fatalf("%d upstream HEADs in %s with freshness %s (want <= %d)", heads, elapsed, freshness, allowed)
	}
	t.Logf("100 warm pulls in %s: upstream %+v -> %+v", elapsed, before, after)

	// Upstream moves the tag; past the window the next pull sees it.
	img2 := harness.RandomImage(t, 1, 2048)
	md2 := h.Retag(t, "library/app", "v1", img2)
	time.Sleep(freshness + 200*time.Millisecond)
	resp, body := do(t, "GET", nsURL(c.url(), "/v2/library/app/manifests/v1", h.Host()))
	if resp.StatusCode != 200 || digest.FromBytes(body) != md2 || resp.Header.Get("Docker-Content-Digest") != md2.String() {
		t.Fatalf("after re-tag: %d got %s (header %s), want %s", resp.StatusCode, digest.FromBytes(body), resp.Header.Get("Docker-Content-Digest"), md2)
	}
	got, err = ggcrPull(ctx, c.addr, "library/app", "v1", h.Host())
	if err != nil {
		t.Fatal(err)
	}
	if err := imageContent(t, img2).same(got); err != nil {
		t.Fatalf("pull after re-tag: %v", err)
	}
	if n := h.Counts().ManifestGET - after.ManifestGET; n != 1 {
		t.Fatalf("re-tag cost %d counted GETs, want 1", n)
	}
	_ = fmt.Sprint
}
