package bench

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/distribution/distribution/v3/configuration"
	_ "github.com/distribution/distribution/v3/registry/storage/driver/filesystem" // registers the "filesystem" driver
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/static"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/opencontainers/go-digest"

	"github.com/shoal-oci/shoal/oci"
	"github.com/shoal-oci/shoal/test/harness"
	"github.com/shoal-oci/shoal/test/hub"
)

// registry is one contender of the cache comparison: a base URL, the query
// it adds to every request (shoal: ?ns=<hub host>), and the hub behind it.
type registry struct {
	name  string
	base  string
	query string
	hub   *hub.Hub
}

func (r registry) url(repo, kind, ref string) string {
	return r.base + "/v2/" + repo + "/" + kind + "/" + ref + r.query
}

// startShoalCache runs `shoal cache` on random loopback ports with the given
// upstream hubs and extra flags, and stops it when the benchmark ends.
func startShoalCache(b *testing.B, bin string, hubs []*hub.Hub, extra ...string) string {
	b.Helper()
	dir := b.TempDir()
	addr := fmt.Sprintf("127.0.0.1:%d", harness.FreePort(b))
	metrics := fmt.Sprintf("127.0.0.1:%d", harness.FreePort(b))
	args := []string{"cache", "--addr", addr, "--metrics-addr", metrics, "--data-dir", dir, "--log-level", "warn"}
	for _, h := range hubs {
		args = append(args, "--upstream", h.Host()+"="+h.URL())
	}
	args = append(args, extra...)
	logf, err := os.Create(filepath.Join(dir, "cache.log"))
	if err != nil {
		b.Fatal(err)
	}
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	// Registered first, so that it runs after the process has stopped.
	b.Cleanup(func() {
		logf.Close()
		if b.Failed() {
			log, _ := os.ReadFile(filepath.Join(dir, "cache.log"))
			b.Logf("shoal cache log:\n%s", log)
		}
	})
	done, err := harness.Spawn(b, cmd, syscall.SIGTERM, 10*time.Second)
	if err != nil {
		b.Fatalf("start shoal cache: %v", err)
	}
	c := &http.Client{Timeout: time.Second}
	waitFor(b, 20*time.Second, "shoal cache ready", func() error {
		select {
		case <-done:
			log, _ := os.ReadFile(filepath.Join(dir, "cache.log"))
			b.Fatalf("shoal cache exited:\n%s", log)
		default:
		}
		resp, err := c.Get("http://" + metrics + "/readyz")
		if err != nil {
			return err
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("readyz: %s", resp.Status)
		}
		return nil
	})
	return "http://" + addr
}

// startProxy runs distribution v3 in proxy mode in
// process, with filesystem storage, pulling through from h, and returns its base URL.
func startProxy(b *testing.B, h *hub.Hub) string {
	return startProxyTTL(b, h, 0)
}

// startProxyTTL is startProxy with the proxy's content TTL set (0: its default).
func startProxyTTL(b *testing.B, h *hub.Hub, ttl time.Duration) string {
	p := &configuration.Proxy{RemoteURL: h.URL()}
	if ttl > 0 {
		p.TTL = &ttl
	}
	return startDistribution(b, p)
}

// rawImage is a linux/amd64 image with one uncompressed layer of size random
// bytes: quick to build, and the layer is exactly size bytes.
func rawImage(b *testing.B, size int) (v1.Image, digest.Digest) {
	b.Helper()
	data := make([]byte, size)
	if _, err := rand.Read(data); err != nil {
		b.Fatal(err)
	}
	layer := static.NewLayer(data, types.OCIUncompressedLayer)
	img := mutate.MediaType(empty.Image, types.OCIManifestSchema1)
	img = mutate.ConfigMediaType(img, types.OCIConfigJSON)
	img, err := mutate.AppendLayers(img, layer)
	if err != nil {
		b.Fatal(err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		b.Fatal(err)
	}
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture = "linux", "amd64"
	if img, err = mutate.ConfigFile(img, cf); err != nil {
		b.Fatal(err)
	}
	return img, digest.FromBytes(data)
}

// get sends method to url (Accept: manifests) and returns status, headers
// and the body read whole.
func get(c *http.Client, method, url string) (int, http.Header, []byte, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, method, url, nil)
	if err != nil {
		return 0, nil, nil, err
	}
	req.Header.Set("Accept", oci.ManifestAccept)
	resp, err := c.Do(req)
	if err != nil {
		return 0, nil, nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	return resp.StatusCode, resp.Header, body, err
}

// pull pulls repo:tag the way containerd does: HEAD the tag, GET the
// manifest by digest, then GET its config and layers. byTag makes it GET the
// manifest by tag instead, as Docker does. It returns the manifest digest.
func pull(c *http.Client, r registry, repo, tag string, byTag bool) (digest.Digest, error) {
	var d digest.Digest
	var body []byte
	if byTag {
		st, h, bd, err := get(c, http.MethodGet, r.url(repo, "manifests", tag))
		if err != nil || st != http.StatusOK {
			return "", fmt.Errorf("%s: GET tag %s: %d %v", r.name, tag, st, err)
		}
		d, body = digest.Digest(h.Get("Docker-Content-Digest")), bd
	} else {
		st, h, _, err := get(c, http.MethodHead, r.url(repo, "manifests", tag))
		if err != nil || st != http.StatusOK {
			return "", fmt.Errorf("%s: HEAD tag %s: %d %v", r.name, tag, st, err)
		}
		d = digest.Digest(h.Get("Docker-Content-Digest"))
		st, _, bd, err := get(c, http.MethodGet, r.url(repo, "manifests", d.String()))
		if err != nil || st != http.StatusOK {
			return "", fmt.Errorf("%s: GET manifest %s: %d %v", r.name, d, st, err)
		}
		body = bd
	}
	if digest.FromBytes(body) != d {
		return "", fmt.Errorf("%s: manifest body does not match %q", r.name, d)
	}
	var m struct {
		Config struct{ Digest digest.Digest }   `json:"config"`
		Layers []struct{ Digest digest.Digest } `json:"layers"`
	}
	if err := json.Unmarshal(body, &m); err != nil {
		return "", fmt.Errorf("%s: manifest: %w", r.name, err)
	}
	blobs := []digest.Digest{m.Config.Digest}
	for _, l := range m.Layers {
		blobs = append(blobs, l.Digest)
	}
	for _, bd := range blobs {
		st, _, data, err := get(c, http.MethodGet, r.url(repo, "blobs", bd.String()))
		if err != nil || st != http.StatusOK {
			return "", fmt.Errorf("%s: GET blob %s: %d %v", r.name, bd, st, err)
		}
		if digest.FromBytes(data) != bd {
			return "", fmt.Errorf("%s: blob %s: bytes do not match", r.name, bd)
		}
	}
	return d, nil
}

// BenchmarkCacheVsProxy compares `shoal cache` with distribution v3's proxy
// mode, each in front of its own fake Docker Hub, on the points issue 3
// names: concurrent cold misses, a HEAD of an uncached manifest, repeated
// pulls of a cached tag past the freshness window, several upstreams, and
// time to first byte of a cold blob over a throttled upstream.
func BenchmarkCacheVsProxy(b *testing.B) {
	if !onlyOnce(b) {
		return
	}
	bin := requireShoal(b)
	const freshness = 200 * time.Millisecond
	hubS := hub.Start(b, hub.WithAnonymousLimit(hub.Unlimited))
	hubS2 := hub.Start(b, hub.WithAnonymousLimit(hub.Unlimited))
	hubP := hub.Start(b, hub.WithAnonymousLimit(hub.Unlimited))
	shoal := registry{name: "shoal", base: startShoalCache(b, bin, []*hub.Hub{hubS, hubS2}, "--tag-freshness", freshness.String()),
		query: "?ns=" + hubS.Host(), hub: hubS}
	proxy := registry{name: "proxy", base: startProxy(b, hubP), hub: hubP}
	both := []registry{shoal, proxy}
	c := newClient()

	fmt.Printf("%-62s %12s %12s  %s\n", "CACHE COMPARISON", "shoal", "dist-proxy", "verdict")
	// row prints one comparison. verdict is "win", "tie", "lose" or "info";
	// the target is "shoal no worse than the proxy", so only "lose" fails.
	row := func(what string, s, p any, verdict string) {
		fmt.Printf("%-62s %12v %12v  %s\n", what, s, p, verdict)
		pass := "PASS"
		if verdict == "lose" {
			pass = "FAIL"
		}
		fmt.Printf("RESULT cache/%s shoal=%v proxy=%v %s: %s\n", what, s, p, verdict, pass)
	}
	better := func(s, p bool) string {
		switch {
		case s == p:
			return "tie"
		case s:
			return "win"
		}
		return "lose"
	}
	fewer := func(s, p int64) string {
		switch {
		case s < p:
			return "win"
		case s == p:
			return "tie"
		}
		return "lose"
	}

	// 1. 16 concurrent cold pulls of one blob.
	img, layer := rawImage(b, 16<<20)
	var conc [2]int64
	for i, r := range both {
		r.hub.Push(b, "library/conc", "v1", img)
		r.hub.ResetCounts()
		r.hub.SetBandwidth(32 << 20) // the fetch takes ~0.5s, so the 16 overlap
		var wg sync.WaitGroup
		errs := make(chan error, 16)
		for range 16 {
			wg.Go(func() {
				st, _, data, err := get(c, http.MethodGet, r.url("library/conc", "blobs", layer.String()))
				switch {
				case err != nil:
					errs <- err
				case st != http.StatusOK:
					errs <- fmt.Errorf("%s: status %d", r.name, st)
				case digest.FromBytes(data) != layer:
					errs <- fmt.Errorf("%s: wrong bytes", r.name)
				}
			})
		}
		wg.Wait()
		r.hub.SetBandwidth(0)
		close(errs)
		for err := range errs {
			b.Errorf("concurrent pull: %v", err)
		}
		conc[i] = r.hub.BlobGETs(layer)
	}
	row("16 concurrent cold GETs of one blob: upstream blob GETs", conc[0], conc[1], fewer(conc[0], conc[1]))

	// 2. A client HEAD of an uncached manifest.
	img2, _ := rawImage(b, 1024)
	var headGET, headHEAD [2]int64
	for i, r := range both {
		r.hub.Push(b, "library/headme", "v1", img2)
		r.hub.ResetCounts()
		st, _, _, err := get(c, http.MethodHead, r.url("library/headme", "manifests", "v1"))
		if err != nil || st != http.StatusOK {
			b.Fatalf("%s: HEAD uncached manifest: %d %v", r.name, st, err)
		}
		cn := r.hub.Counts()
		headGET[i], headHEAD[i] = cn.ManifestGET, cn.ManifestHEAD
	}
	row("HEAD of an uncached manifest: counted upstream GETs", headGET[0], headGET[1], fewer(headGET[0], headGET[1]))
	row("HEAD of an uncached manifest: upstream HEADs (free)", headHEAD[0], headHEAD[1], "info")

	// 3. 50 pulls of a cached tag, each past the freshness window, then a re-tag.
	img3, _ := rawImage(b, 4096)
	img3b, _ := rawImage(b, 4096)
	for _, byTag := range []bool{false, true} {
		style, repo := "HEAD tag+GET digest", "library/fresh"
		if byTag {
			style, repo = "GET by tag", "library/freshget"
		}
		var gets, heads [2]int64
		var retagOK [2]bool
		for i, r := range both {
			r.hub.Push(b, repo, "latest", img3)
			if _, err := pull(c, r, repo, "latest", byTag); err != nil { // prime the cache
				b.Fatal(err)
			}
			r.hub.ResetCounts()
			for range 50 {
				time.Sleep(freshness + 50*time.Millisecond)
				if _, err := pull(c, r, repo, "latest", byTag); err != nil {
					b.Fatal(err)
				}
			}
			cn := r.hub.Counts()
			gets[i], heads[i] = cn.ManifestGET, cn.ManifestHEAD
			want := hub.DigestOf(mustDigest(b, img3b))
			r.hub.Retag(b, repo, "latest", img3b)
			time.Sleep(freshness + 50*time.Millisecond)
			got, err := pull(c, r, repo, "latest", byTag)
			retagOK[i] = err == nil && got == want
		}
		row(fmt.Sprintf("50 pulls past freshness (%s): counted GETs", style), gets[0], gets[1], fewer(gets[0], gets[1]))
		row(fmt.Sprintf("50 pulls past freshness (%s): upstream HEADs", style), heads[0], heads[1], "info")
		row(fmt.Sprintf("after re-tag, next pull gets new digest (%s)", style), retagOK[0], retagOK[1], map[bool]string{true: "info", false: "lose"}[retagOK[0]])
	}

	// 3b. 50 pulls within the freshness window (a shoal cache with the
	// default 5m window; the proxy has no window for tags).
	{
		fresh := registry{name: "shoal", base: startShoalCache(b, bin, []*hub.Hub{hubS}), query: shoal.query, hub: hubS}
		var reqs [2]int64
		for i, r := range []registry{fresh, proxy} {
			r.hub.Push(b, "library/within", "latest", img3)
			if _, err := pull(c, r, "library/within", "latest", false); err != nil {
				b.Fatal(err)
			}
			r.hub.ResetCounts()
			for range 50 {
				if _, err := pull(c, r, "library/within", "latest", false); err != nil {
					b.Fatal(err)
				}
			}
			cn := r.hub.Counts()
			reqs[i] = cn.ManifestGET + cn.ManifestHEAD + cn.BlobGET + cn.BlobHEAD
		}
		row("50 pulls within freshness (5m): any upstream requests", reqs[0], reqs[1], fewer(reqs[0], reqs[1]))
	}

	// 4. Several upstreams from one instance.
	img4, _ := rawImage(b, 1024)
	hubS2.Push(b, "library/second", "v1", img4)
	second := registry{name: "shoal", base: shoal.base, query: "?ns=" + hubS2.Host(), hub: hubS2}
	_, errS := pull(c, second, "library/second", "v1", false)
	// The proxy has one RemoteURL; ?ns= is ignored, so hub 2's repo is unknown to it.
	_, errP := pull(c, registry{name: "proxy", base: proxy.base, query: "?ns=" + hubS2.Host()}, "library/second", "v1", false)
	row("several upstreams from one instance (2nd hub's image)", errS == nil, errP == nil, map[bool]string{true: "win", false: "lose"}[errS == nil && errP != nil])

	// 5. Time to first byte of a cold 64 MiB blob over a throttled upstream.
	const bw = 32 << 20
	var seq int
	whole := map[string][]float64{}
	ttfb := func(r registry) func() (float64, error) {
		return func() (float64, error) {
			seq++
			img, layer := rawImage(b, 64<<20)
			repo := fmt.Sprintf("library/ttfb%d", seq)
			r.hub.Push(b, repo, "v1", img)
			r.hub.SetBandwidth(bw)
			defer r.hub.SetBandwidth(0)
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			req, _ := http.NewRequestWithContext(ctx, http.MethodGet, r.url(repo, "blobs", layer.String()), nil)
			start := time.Now()
			resp, err := c.Do(req)
			if err != nil {
				return 0, err
			}
			defer resp.Body.Close()
			one := make([]byte, 1)
			if _, err := io.ReadFull(resp.Body, one); err != nil {
				return 0, fmt.Errorf("%s: first byte: %w", r.name, err)
			}
			first := time.Since(start)
			n, err := io.Copy(io.Discard, resp.Body)
			if err != nil || n+1 != 64<<20 {
				return 0, fmt.Errorf("%s: body: %d bytes, %v", r.name, n+1, err)
			}
			whole[r.name] = append(whole[r.name], time.Since(start).Seconds())
			logf("    %s: TTFB %s, whole blob %s", r.name, first.Round(time.Millisecond), time.Since(start).Round(time.Millisecond))
			return first.Seconds() * 1000, nil
		}
	}
	logf("TTFB of a cold 64 MiB blob, upstream throttled to %d MiB/s (ms, lower is better)", bw>>20)
	meds := sideBySide(b, envInt("SHOAL_BENCH_TTFB_ROUNDS", 5), "ms", contender{"shoal", ttfb(shoal)}, contender{"proxy", ttfb(proxy)})
	row("TTFB of a cold 64 MiB blob, 32 MiB/s upstream (median ms)", fmt.Sprintf("%.0f", meds[0]), fmt.Sprintf("%.0f", meds[1]), within(meds[0], meds[1]))
	row("  same blobs, time to last byte (median s)", fmt.Sprintf("%.2f", median(whole["shoal"])), fmt.Sprintf("%.2f", median(whole["proxy"])), "info")
	b.ReportMetric(meds[0], "shoal-ttfb-ms")
	b.ReportMetric(meds[1], "proxy-ttfb-ms")

	// 6. Upstream outage: a pull of an image cached before (past the
	// freshness window), and of one never cached.
	{
		var ok [2]bool
		var cold [2]string
		for i, r := range both {
			img, _ := rawImage(b, 4096)
			r.hub.Push(b, "library/outage", "v1", img)
			if _, err := pull(c, r, "library/outage", "v1", false); err != nil {
				b.Fatal(err)
			}
			r.hub.Push(b, "library/never", "v1", img)
			time.Sleep(2 * freshness)
			r.hub.SetOutage(true)
			_, err := pull(c, r, "library/outage", "v1", false)
			ok[i] = err == nil
			st, _, _, _ := get(c, http.MethodHead, r.url("library/never", "manifests", "v1"))
			cold[i] = fmt.Sprint(st)
			r.hub.SetOutage(false)
		}
		row("upstream down: pull of a cached image succeeds", ok[0], ok[1], better(ok[0], ok[1]))
		row("upstream down: status for an image never cached", cold[0], cold[1], "info")
	}

	// 7. Rate limit reached: a pull of a cached image past the freshness
	// window, and the counted GETs still sent upstream for uncached images.
	{
		limS := hub.Start(b, hub.WithAnonymousLimit(2))
		limP := hub.Start(b, hub.WithAnonymousLimit(2))
		rs := []registry{
			{name: "shoal", base: startShoalCache(b, bin, []*hub.Hub{limS}, "--tag-freshness", freshness.String(), "--budget-reserve", "0"), query: "?ns=" + limS.Host(), hub: limS},
			{name: "proxy", base: startProxy(b, limP), hub: limP},
		}
		var ok [2]bool
		var sent [2]int64
		for i, r := range rs {
			for j := range 2 {
				img, _ := rawImage(b, 2048)
				r.hub.Push(b, fmt.Sprintf("library/limited%d", j), "v1", img)
				if _, err := pull(c, r, fmt.Sprintf("library/limited%d", j), "v1", false); err != nil {
					b.Fatal(err)
				}
			}
			// The budget is now spent. Move a cached tag and try five new images.
			img, _ := rawImage(b, 2048)
			r.hub.Retag(b, "library/limited0", "v1", img)
			time.Sleep(2 * freshness)
			_, err := pull(c, r, "library/limited0", "v1", false)
			ok[i] = err == nil
			before := r.hub.Counts()
			for j := range 5 {
				r.hub.Push(b, fmt.Sprintf("library/fresh%d", j), "v1", img)
				_, _ = pull(c, r, fmt.Sprintf("library/fresh%d", j), "v1", false)
			}
			after := r.hub.Counts()
			sent[i] = (after.ManifestGET + after.Throttled) - (before.ManifestGET + before.Throttled)
		}
		row("rate limit reached: pull of a cached image (tag moved) succeeds", ok[0], ok[1], better(ok[0], ok[1]))
		row("rate limit reached: counted GETs sent for 5 uncached images", sent[0], sent[1], fewer(sent[0], sent[1]))
	}

	// 8. Content TTL: two repositories share a layer; once the first
	// repository's content expires (proxy TTL 2s), pull the second.
	{
		ttlHub := hub.Start(b, hub.WithAnonymousLimit(hub.Unlimited))
		shHub := hub.Start(b, hub.WithAnonymousLimit(hub.Unlimited))
		rs := []registry{
			{name: "shoal", base: startShoalCache(b, bin, []*hub.Hub{shHub}), query: "?ns=" + shHub.Host(), hub: shHub},
			{name: "proxy", base: startProxyTTL(b, ttlHub, 2*time.Second), hub: ttlHub},
		}
		var refetch [2]int64
		layer, _ := rawImage(b, 64<<10)
		// t=0: repository one; t=1.2s: repository two, whose own content
		// is then good until t=3.2s; at t=2.5s one has expired, two has not.
		for _, r := range rs {
			r.hub.Push(b, "library/one", "v1", layer)
			r.hub.Push(b, "library/two", "v1", layer)
			if _, err := pull(c, r, "library/one", "v1", false); err != nil {
				b.Fatal(err)
			}
		}
		time.Sleep(1200 * time.Millisecond)
		for _, r := range rs {
			if _, err := pull(c, r, "library/two", "v1", false); err != nil {
				b.Fatal(err)
			}
		}
		time.Sleep(1300 * time.Millisecond)
		for i, r := range rs {
			before := r.hub.Counts().BlobGET
			if _, err := pull(c, r, "library/two", "v1", false); err != nil {
				b.Fatal(err)
			}
			refetch[i] = r.hub.Counts().BlobGET - before
		}
		row("layer shared with a live repo, after the other's TTL: refetched blobs", refetch[0], refetch[1], fewer(refetch[0], refetch[1]))
	}
}

// within compares two timings in ms (lower is better): a difference under
// 20% or under 10 ms is a tie on this shared machine.
func within(s, p float64) string {
	switch {
	case s < 0.8*p && p-s >= 10:
		return "win"
	case s > 1.2*p && s-p >= 10:
		return "lose"
	}
	return "tie"
}

func mustDigest(b *testing.B, img v1.Image) v1.Hash {
	b.Helper()
	d, err := img.Digest()
	if err != nil {
		b.Fatal(err)
	}
	return d
}
