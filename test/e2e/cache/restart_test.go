package cache_e2e

import (
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/shoal-oci/shoal/test/harness"
	"github.com/shoal-oci/shoal/test/hub"
)

// TestCachedContentSurvivesRestart: a new process on the same data
// directory serves what the old one cached, even with upstream down.
func TestCachedContentSurvivesRestart(t *testing.T) {
	h := hub.Start(t)
	img := harness.RandomImage(t, 2, 8192)
	md := h.Push(t, "library/app", "v1", img)
	want := imageContent(t, img)
	dataDir := t.TempDir()
	first := startCache(t, h, cacheOpts{name: "first", dataDir: dataDir})
	pullAll(t, first, h, "library/app", "v1", want)
	first.stop()

	h.SetOutage(true)
	second := startCache(t, h, cacheOpts{name: "second", dataDir: dataDir})
	pullAll(t, second, h, "library/app", "v1", want)
	resp, body := do(t, "GET", nsURL(second.url(), "/v2/library/app/manifests/v1", h.Host()))
	if resp.StatusCode != 200 || digest.FromBytes(body) != md {
		t.Fatalf("tag after restart: %d", resp.StatusCode)
	}
}

// TestSlowUpstreamServesStale: an upstream slower than --upstream-timeout
// makes a cached tag be served stale (reason timeout) within about the
// deadline, not after upstream finally answers.
func TestSlowUpstreamServesStale(t *testing.T) {
	h := hub.Start(t)
	img := harness.RandomImage(t, 1, 4096)
	md := h.Push(t, "library/app", "v1", img)
	c := startCache(t, h, cacheOpts{args: []string{"--tag-freshness", "500ms", "--upstream-timeout", "1s"}})
	pullAll(t, c, h, "library/app", "v1", imageContent(t, img))
	h.SetLatency(4 * time.Second)
	time.Sleep(600 * time.Millisecond)
	start := time.Now()
	resp, body := do(t, "GET", nsURL(c.url(), "/v2/library/app/manifests/v1", h.Host()))
	elapsed := time.Since(start)
	h.SetLatency(0)
	if resp.StatusCode != 200 || digest.FromBytes(body) != md || !strings.Contains(resp.Header.Get("Warning"), "stale") {
		t.Fatalf("slow upstream: %d warning %q", resp.StatusCode, resp.Header.Get("Warning"))
	}
	if elapsed > 3*time.Second {
		t.Fatalf("the stale answer took %s: the upstream deadline was not applied", elapsed)
	}
	if n := c.metric(t, "shoal_cache_stale_served_total", `reason="timeout"`); n < 1 {
		t.Fatalf("stale serves with reason timeout = %v", n)
	}
}
