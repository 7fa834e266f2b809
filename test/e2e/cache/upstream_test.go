package cache_e2e

import (
	"context"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/shoal-oci/shoal/test/harness"
	"github.com/shoal-oci/shoal/test/hub"
)

// pullAll pulls repo:tag through the cache with ?ns=<hub> and checks it
// against want.
func pullAll(t *testing.T, c *cacheProc, h *hub.Hub, repo, tag string, want content) {
	t.Helper()
	got, err := ggcrPull(context.Background(), c.addr, repo, tag, h.Host())
	if err != nil {
		t.Fatalf("pull %s:%s: %v", repo, tag, err)
	}
	if err := want.same(got); err != nil {
		t.Fatalf("pull %s:%s: %v", repo, tag, err)
	}
}

// TestBudgetExhaustedServesCachedTagsStale: once the Docker Hub budget is
// spent, cached tags are still served (stale, with a Warning, counted in
// shoal_cache_stale_served_total) and an uncached tag gets a clear 429.
func TestBudgetExhaustedServesCachedTagsStale(t *testing.T) {
	h := hub.Start(t, hub.WithAnonymousLimit(3))
	img := harness.RandomImage(t, 1, 4096)
	cached := h.Push(t, "library/cached", "v1", img)
	for _, repo := range []string{"library/a", "library/b", "library/cold"} {
		h.Push(t, repo, "v1", harness.RandomImage(t, 1, 1024))
	}
	c := startCache(t, h, cacheOpts{args: []string{"--tag-freshness", "1s", "--budget-reserve", "0"}})
	pullAll(t, c, h, "library/cached", "v1", imageContent(t, img))
	// Spend the rest of the budget.
	for _, repo := range []string{"library/a", "library/b"} {
		if resp, body := do(t, "GET", nsURL(c.url(), "/v2/"+repo+"/manifests/v1", h.Host())); resp.StatusCode != 200 {
			t.Fatalf("spending the budget on %s: %d %s", repo, resp.StatusCode, body)
		}
	}
	if n := h.Counts().ManifestGET; n != 3 {
		t.Fatalf("counted GETs = %d, want 3 (the whole budget)", n)
	}
	staleBefore := c.metric(t, "shoal_cache_stale_served_total")
	// Upstream moves the tag: serving the new content would need a counted GET.
	h.Retag(t, "library/cached", "v1", harness.RandomImage(t, 1, 1024))
	time.Sleep(1200 * time.Millisecond)

	resp, body := do(t, "GET", nsURL(c.url(), "/v2/library/cached/manifests/v1", h.Host()))
	if resp.StatusCode != 200 || digest.FromBytes(body) != cached {
		t.Fatalf("cached tag with the budget spent: %d %s", resp.StatusCode, body)
	}
	if w := resp.Header.Get("Warning"); !strings.Contains(w, "stale") {
		t.Fatalf("stale response without a stale Warning: %q", w)
	}
	// Its blobs are still served.
	pullAll(t, c, h, "library/cached", "v1", imageContent(t, img))
	if n := c.metric(t, "shoal_cache_stale_served_total"); n <= staleBefore {
		t.Fatalf("shoal_cache_stale_served_total did not increase: %v -> %v", staleBefore, n)
	}
	if n := c.metric(t, "shoal_cache_stale_served_total", `reason="rate_limited"`); n < 1 {
		t.Fatalf("stale serves with reason rate_limited = %v", n)
	}

	resp, body = do(t, "GET", nsURL(c.url(), "/v2/library/cold/manifests/v1", h.Host()))
	e, ok := parseOCIError(body)
	if resp.StatusCode != http.StatusTooManyRequests || !ok || e.Code != "TOOMANYREQUESTS" {
		t.Fatalf("uncached tag with the budget spent: %d %s", resp.StatusCode, body)
	}
	if !strings.Contains(e.Message, "not cached") || !(strings.Contains(e.Message, "budget") || strings.Contains(e.Message, "rate")) {
		t.Fatalf("429 message does not say why: %q", e.Message)
	}
	if !strings.HasPrefix(resp.Header.Get("Content-Type"), "application/json") {
		t.Fatalf("429 content type %q", resp.Header.Get("Content-Type"))
	}
	if n := h.Counts().ManifestGET; n != 3 {
		t.Fatalf("the cache spent past an exhausted budget: %d counted GETs", n)
	}
	if ra, err := strconv.Atoi(resp.Header.Get("Retry-After")); err != nil || ra <= 0 {
		t.Fatalf("429 without a usable Retry-After: %q", resp.Header.Get("Retry-After"))
	}
}

// TestOutageServesCachedContent: during an upstream outage cached content
// (tags, manifests by digest, blobs) is served; after the outage and past
// the freshness window, revalidation resumes and a re-tag becomes visible.
func TestOutageServesCachedContent(t *testing.T) {
	h := hub.Start(t)
	img := harness.RandomImage(t, 2, 8192)
	md := h.Push(t, "library/app", "v1", img)
	want := imageContent(t, img)
	c := startCache(t, h, cacheOpts{args: []string{"--tag-freshness", "1s", "--upstream-timeout", "2s"}})
	pullAll(t, c, h, "library/app", "v1", want)
	// containerd's way: HEAD the tag, then GET the manifest by digest.
	img2 := harness.RandomImage(t, 1, 4096)
	mdc := h.Push(t, "library/ctrd", "v1", img2)
	if resp, _ := do(t, "HEAD", nsURL(c.url(), "/v2/library/ctrd/manifests/v1", h.Host())); resp.StatusCode != 200 || resp.Header.Get("Docker-Content-Digest") != mdc.String() {
		t.Fatalf("HEAD tag: %d %s", resp.StatusCode, resp.Header.Get("Docker-Content-Digest"))
	}
	if resp, _ := do(t, "GET", nsURL(c.url(), "/v2/library/ctrd/manifests/"+mdc.String(), h.Host())); resp.StatusCode != 200 {
		t.Fatalf("GET by digest: %d", resp.StatusCode)
	}

	h.SetOutage(true)
	time.Sleep(1200 * time.Millisecond) // past the freshness window
	resp, body := do(t, "GET", nsURL(c.url(), "/v2/library/app/manifests/v1", h.Host()))
	if resp.StatusCode != 200 || digest.FromBytes(body) != md || !strings.Contains(resp.Header.Get("Warning"), "stale") {
		t.Fatalf("tag during outage: %d warning %q", resp.StatusCode, resp.Header.Get("Warning"))
	}
	resp, _ = do(t, "HEAD", nsURL(c.url(), "/v2/library/app/manifests/v1", h.Host()))
	if resp.StatusCode != 200 || resp.Header.Get("Docker-Content-Digest") != md.String() {
		t.Fatalf("HEAD tag during outage: %d", resp.StatusCode)
	}
	for _, m := range []string{"HEAD", "GET"} {
		resp, _ := do(t, m, nsURL(c.url(), "/v2/library/ctrd/manifests/v1", h.Host()))
		if resp.StatusCode != 200 || resp.Header.Get("Docker-Content-Digest") != mdc.String() {
			t.Errorf("%s of a tag pulled the containerd way, during the outage: %d", m, resp.StatusCode)
		}
	}
	pullAll(t, c, h, "library/app", "v1", want) // tag, manifest and blobs
	for d, b := range want {
		resp, body := do(t, "GET", nsURL(c.url(), "/v2/library/app/"+kindOf(d, md)+"/"+d.String(), h.Host()))
		if resp.StatusCode != 200 || string(body) != string(b) {
			t.Fatalf("%s during outage: %d", d, resp.StatusCode)
		}
	}
	if n := c.metric(t, "shoal_cache_stale_served_total", `reason="unavailable"`); n < 1 {
		t.Fatalf("stale serves with reason unavailable = %v", n)
	}
	if h.Counts().Outage == 0 {
		t.Fatal("the cache never asked upstream during the outage: the test proves nothing")
	}
	// Uncached content during the outage: a clear 503.
	resp, body = do(t, "GET", nsURL(c.url(), "/v2/library/other/manifests/v1", h.Host()))
	if e, ok := parseOCIError(body); resp.StatusCode != 503 || !ok || e.Code != "UNAVAILABLE" {
		t.Fatalf("uncached during outage: %d %s", resp.StatusCode, body)
	}

	h.SetOutage(false)
	md2 := h.Retag(t, "library/app", "v1", harness.RandomImage(t, 1, 1024))
	time.Sleep(1200 * time.Millisecond)
	heads := h.Counts().ManifestHEAD
	resp, body = do(t, "GET", nsURL(c.url(), "/v2/library/app/manifests/v1", h.Host()))
	if resp.StatusCode != 200 || digest.FromBytes(body) != md2 || resp.Header.Get("Warning") != "" {
		t.Fatalf("after the outage: %d got %s want %s, warning %q", resp.StatusCode, digest.FromBytes(body), md2, resp.Header.Get("Warning"))
	}
	if h.Counts().ManifestHEAD <= heads {
		t.Fatal("no revalidation HEAD after the outage")
	}
}

func kindOf(d, manifest digest.Digest) string {
	if d == manifest {
		return "manifests"
	}
	return "blobs"
}

// TestCorruptUpstreamBlobIsNotStored: an upstream that sends corrupted blob
// bytes gets nothing stored, and the client gets an error, never a 200 with
// a complete body.
func TestCorruptUpstreamBlobIsNotStored(t *testing.T) {
	h := hub.Start(t)
	img := harness.RandomImage(t, 1, 256<<10)
	md := h.Push(t, "library/app", "v1", img)
	layers, _ := img.Layers()
	lh, _ := layers[0].Digest()
	ld := digest.Digest(lh.String())
	c := startCache(t, h, cacheOpts{})
	if resp, _ := do(t, "GET", nsURL(c.url(), "/v2/library/app/manifests/v1", h.Host())); resp.StatusCode != 200 {
		t.Fatalf("manifest: %d", resp.StatusCode)
	}
	h.CorruptBlob(ld, true)

	resp, err := http.Get(nsURL(c.url(), "/v2/library/app/blobs/"+ld.String(), h.Host()))
	if err == nil {
		b, rerr := io.ReadAll(resp.Body)
		resp.Body.Close()
		if rerr == nil && resp.StatusCode == 200 {
			t.Fatalf("corrupt blob answered 200 with a complete body (%d bytes, digest %s)", len(b), digest.FromBytes(b))
		}
		t.Logf("client saw: status %d, read error %v", resp.StatusCode, rerr)
	} else {
		t.Logf("client saw: %v", err)
	}
	// A real client fails too.
	if _, err := ggcrPull(context.Background(), c.addr, "library/app", "v1", h.Host()); err == nil {
		t.Fatal("a pull of an image with a corrupt layer succeeded")
	}
	// Nothing with that digest is in storage.
	var found []string
	_ = filepath.Walk(c.dataDir, func(p string, fi os.FileInfo, err error) error {
		if err == nil && strings.Contains(p, ld.Encoded()) {
			found = append(found, p)
		}
		return nil
	})
	if len(found) > 0 {
		t.Fatalf("storage holds the corrupt blob: %v", found)
	}
	if !strings.Contains(c.log(), "do not match") {
		t.Error("the cache did not log the digest mismatch")
	}

	h.CorruptBlob(ld, false)
	gets := h.BlobGETs(ld)
	pullAll(t, c, h, "library/app", "v1", imageContent(t, img))
	if h.BlobGETs(ld) != gets+1 {
		t.Fatalf("after repair: %d upstream GETs of the blob, want %d (a corrupt copy was kept?)", h.BlobGETs(ld), gets+1)
	}
	_ = md
}
