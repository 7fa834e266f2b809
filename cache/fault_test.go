package cache_test

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/opencontainers/go-digest"

	"github.com/shoal-oci/shoal/cache"
	"github.com/shoal-oci/shoal/cache/flight"
	"github.com/shoal-oci/shoal/test/harness"
	"github.com/shoal-oci/shoal/test/hub"
	"github.com/shoal-oci/shoal/upstream/budget"
)

// An upstream that streams blobs without Content-Length (chunked, or
// gzip-encoded) is served whole, byte-identical, with one upstream GET per
// blob however many clients ask at once, and Range requests still work.
func TestUpstreamUnsizedBlob_ServedWholeAndOnce(t *testing.T) {
	for _, mode := range []string{"chunked", "gzip"} {
		t.Run(mode, func(t *testing.T) {
			f := newFixture(t, nil, nil)
			if mode == "chunked" {
				f.hub.SetChunkedBlobs(true)
			} else {
				f.hub.SetGzipBlobs(true)
			}
			img := hub.Image(t, 300_000, 1)
			f.hub.Push(t, "library/app", "v1", img)
			layers, _ := img.Layers()
			ld, _ := layers[0].Digest()
			lb, _ := layers[0].Compressed()
			want, _ := io.ReadAll(lb)

			var wg sync.WaitGroup
			errs := make(chan string, 8)
			for range 8 {
				wg.Add(1)
				go func() {
					defer wg.Done()
					resp, body := f.get(t, "GET", "/v2/library/app/blobs/"+ld.String())
					if resp.StatusCode != 200 || !bytes.Equal(body, want) {
						errs <- resp.Status
					}
				}()
			}
			wg.Wait()
			close(errs)
			for e := range errs {
				t.Errorf("concurrent GET of an unsized upstream blob: %s", e)
			}
			if n := f.hub.BlobGETs(hub.DigestOf(ld)); n != 1 {
				t.Errorf("upstream blob GETs = %d, want 1", n)
			}
			resp, body := f.get(t, "GET", "/v2/library/app/blobs/"+ld.String(), "Range", "bytes=100-199")
			if resp.StatusCode != 206 || !bytes.Equal(body, want[100:200]) {
				t.Errorf("Range after an unsized fetch: %d, %d bytes", resp.StatusCode, len(body))
			}
		})
	}
}

// A Range request or a HEAD that arrives while an unsized fetch is still
// running waits for its size, then gets the right answer.
func TestUpstreamUnsizedBlob_RangeDuringFetch(t *testing.T) {
	f := newFixture(t, nil, nil)
	f.hub.SetChunkedBlobs(true)
	f.hub.SetBandwidth(2 << 20)
	img := hub.Image(t, 1<<20, 1)
	f.hub.Push(t, "library/app", "v1", img)
	layers, _ := img.Layers()
	ld, _ := layers[0].Digest()
	lb, _ := layers[0].Compressed()
	want, _ := io.ReadAll(lb)
	resp, body := f.get(t, "GET", "/v2/library/app/blobs/"+ld.String(), "Range", "bytes=1000-")
	if resp.StatusCode != 206 || !bytes.Equal(body, want[1000:]) {
		t.Fatalf("Range of a cold unsized blob: %d, %d bytes", resp.StatusCode, len(body))
	}
	if n := f.hub.BlobGETs(hub.DigestOf(ld)); n != 1 {
		t.Errorf("upstream blob GETs = %d, want 1", n)
	}
}

// --tag-freshness 0 means what it says: every pull revalidates with a free
// HEAD, and during an outage the tag is served stale with a Warning.
func TestTagFreshnessZero_RevalidatesEveryPull(t *testing.T) {
	f := newFixture(t, nil, func(c *cache.Config) { c.TagFreshness = 0 })
	img := hub.Image(t, 10_000, 1)
	f.hub.Push(t, "library/app", "v1", img)
	for i := range 3 {
		resp, _ := f.get(t, "GET", "/v2/library/app/manifests/v1")
		if resp.StatusCode != 200 {
			t.Fatalf("pull %d: %d", i, resp.StatusCode)
		}
	}
	if c := f.hub.Counts(); c.ManifestHEAD != 3 || c.ManifestGET != 1 {
		t.Fatalf("3 pulls with freshness 0: %d HEADs, %d GETs upstream; want 3 and 1", c.ManifestHEAD, c.ManifestGET)
	}
	f.hub.SetOutage(true)
	resp, _ := f.get(t, "GET", "/v2/library/app/manifests/v1")
	if resp.StatusCode != 200 || resp.Header.Get("Warning") == "" {
		t.Fatalf("pull during outage: %d, Warning %q; want 200 with a stale warning", resp.StatusCode, resp.Header.Get("Warning"))
	}
}

// An upstream that sends headers and part of a blob, then stalls, fails the
// fetch after the idle timeout instead of holding every waiter; the next
// pull, with upstream healthy again, succeeds.
func TestUpstreamStalledBody_FailsFastThenRecovers(t *testing.T) {
	f := newFixture(t, nil, func(c *cache.Config) { c.UpstreamIdleTimeout = 300 * time.Millisecond })
	img := hub.Image(t, 200_000, 1)
	f.hub.Push(t, "library/app", "v1", img)
	layers, _ := img.Layers()
	ld, _ := layers[0].Digest()
	lb, _ := layers[0].Compressed()
	want, _ := io.ReadAll(lb)
	f.hub.SetStallBlobs(50_000)

	start := time.Now()
	req, _ := http.NewRequest("GET", f.srv.URL+"/v2/library/app/blobs/"+ld.String()+"?ns="+f.ns, nil)
	resp, err := http.DefaultClient.Do(req)
	if err == nil {
		_, err = io.ReadAll(resp.Body)
		resp.Body.Close()
	}
	if err == nil && resp.StatusCode == 200 {
		t.Fatal("a stalled upstream body was delivered as complete")
	}
	if d := time.Since(start); d > 20*time.Second {
		t.Fatalf("stalled fetch took %s to fail", d)
	}
	f.hub.SetStallBlobs(-1)
	resp2, body := f.get(t, "GET", "/v2/library/app/blobs/"+ld.String())
	if resp2.StatusCode != 200 || !bytes.Equal(body, want) {
		t.Fatalf("pull after the stall: %d, %d bytes", resp2.StatusCode, len(body))
	}
}

// One client (node) cannot spend more than its share of the window's counted
// pulls: past it, it gets 429 with a message that says why, while another
// client still pulls.
func TestBudgetClientShare_NoClientDrainsTheBudget(t *testing.T) {
	f := newFixtureBudget(t, []hub.Option{hub.WithAnonymousLimit(20)},
		budget.New(budget.NewMemoryState(), budget.WithReserve(0), budget.WithClientShare(0.2)), nil)
	client := func(ip string) *http.Client {
		d := &net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(ip)}}
		return &http.Client{Transport: &http.Transport{DialContext: d.DialContext}}
	}
	pull := func(c *http.Client, tag string) (*http.Response, string) {
		req, _ := http.NewRequest("GET", f.srv.URL+"/v2/library/app/manifests/"+tag+"?ns="+f.ns, nil)
		resp, err := c.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp, string(b)
	}
	a, b := client("127.0.0.1"), client("127.0.0.2")
	refusedAt := 0
	for i := 1; i <= 8; i++ {
		tag := fmt.Sprintf("a%d", i)
		f.hub.Push(t, "library/app", tag, hub.Image(t, 1000, 1))
		resp, body := pull(a, tag)
		if resp.StatusCode == 429 {
			if !strings.Contains(body, "this client (node)") || resp.Header.Get("Retry-After") == "" {
				t.Fatalf("429 without a reason or Retry-After: %s", body)
			}
			refusedAt = i
			break
		}
		if resp.StatusCode != 200 {
			t.Fatalf("pull %d: %d %s", i, resp.StatusCode, body)
		}
	}
	// A share of 0.2 of 20 is 4 counted pulls (the free HEAD before the
	// first GET already told the limit): the fifth is refused.
	if refusedAt != 5 {
		t.Fatalf("client A refused at pull %d, want 5", refusedAt)
	}
	f.hub.Push(t, "library/app", "b1", hub.Image(t, 1000, 1))
	if resp, body := pull(b, "b1"); resp.StatusCode != 200 {
		t.Fatalf("client B after A's share is spent: %d %s", resp.StatusCode, body)
	}
}

// When the spool's disk has no room for a blob, the pull still completes,
// byte-identical, straight from upstream (not cached), and is counted; a
// blob that fits is cached as usual.
func TestDiskFull_BlobServedStraightFromUpstream(t *testing.T) {
	harness.RequireRoot(t)
	dir := t.TempDir()
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=100m", "tmpfs", dir).CombinedOutput(); err != nil {
		harness.Missing(t, "mount a tmpfs for the disk-full case: %v %s", err, out)
	}
	t.Cleanup(func() { _ = exec.Command("umount", "-l", dir).Run() })
	fl, err := flight.NewLocal(dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_ = fl.Drain(ctx)
	})
	f := newFixture(t, nil, func(c *cache.Config) { c.Flight = fl })
	img := hub.Image(t, 20<<20, 1) // 2×20 MiB + the margin does not fit 100 MiB
	small := hub.Image(t, 1<<20, 1)
	f.hub.Push(t, "library/big", "v1", img)
	f.hub.Push(t, "library/small", "v1", small)
	blob := func(img v1.Image) (digest.Digest, []byte) {
		ls, _ := img.Layers()
		d, _ := ls[0].Digest()
		rc, _ := ls[0].Compressed()
		b, _ := io.ReadAll(rc)
		return hub.DigestOf(d), b
	}
	bd, bb := blob(img)
	for i := range 2 {
		resp, body := f.get(t, "GET", "/v2/library/big/blobs/"+bd.String())
		if resp.StatusCode != 200 || !bytes.Equal(body, bb) {
			t.Fatalf("pull %d of a blob that does not fit: %d, %d bytes", i, resp.StatusCode, len(body))
		}
	}
	// Not cached (each pull went upstream), and at most one aborted GET
	// (the fetch that found no room) beside each pass-through.
	if n := f.hub.BlobGETs(bd); n < 2 || n > 4 {
		t.Errorf("upstream GETs for 2 pulls with the disk full = %d, want 2 to 4", n)
	}
	sd, sb := blob(small)
	for range 2 {
		resp, body := f.get(t, "GET", "/v2/library/small/blobs/"+sd.String())
		if resp.StatusCode != 200 || !bytes.Equal(body, sb) {
			t.Fatalf("small blob: %d", resp.StatusCode)
		}
	}
	if n := f.hub.BlobGETs(sd); n != 1 {
		t.Errorf("a blob that fits was fetched %d times, want 1 (cached)", n)
	}
	if err := f.c.Ready(context.Background()); err != nil {
		t.Errorf("not ready with the spool disk full: %v", err)
	}
}

// A replica killed mid-commit leaves an unfinished storage upload; the
// purge removes it once it is old, and never a fresh one (another replica
// may be committing it now).
func TestInterruptedCommit_UploadPurged(t *testing.T) {
	f := newFixture(t, nil, nil)
	ctx := context.Background()
	if err := cache.StartUploadForTest(ctx, f.c); err != nil {
		t.Fatal(err)
	}
	count := func() int {
		t.Helper()
		n, err := cache.UploadsForTest(ctx, f.c)
		if err != nil {
			t.Fatal(err)
		}
		return n
	}
	if count() != 1 {
		t.Fatalf("want one unfinished upload to start with, have %d", count())
	}
	f.c.PurgeUploads(ctx) // an hour's grace: a fresh upload stays
	if count() != 1 {
		t.Fatal("a fresh upload was purged")
	}
	cache.PurgeUploadsBeforeForTest(ctx, f.c, time.Now().Add(time.Minute))
	if n := count(); n != 0 {
		t.Fatalf("%d unfinished uploads left after the purge", n)
	}
}
