package bench

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"sync"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/shoal-oci/shoal/test/harness"
	"github.com/shoal-oci/shoal/test/hub"
)

// timedGET GETs url and returns the time to the first body byte, the
// whole time, and whether the body hashed to want.
func timedGET(c *http.Client, url string, want digest.Digest) (ttfb, total time.Duration, err error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return 0, 0, err
	}
	start := time.Now()
	resp, err := c.Do(req)
	if err != nil {
		return 0, 0, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return 0, 0, fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	v := want.Verifier()
	one := make([]byte, 1)
	if _, err := io.ReadFull(resp.Body, one); err != nil {
		return 0, 0, err
	}
	ttfb = time.Since(start)
	_, _ = v.Write(one)
	if _, err := io.Copy(v, resp.Body); err != nil {
		return 0, 0, err
	}
	total = time.Since(start)
	if !v.Verified() {
		return 0, 0, fmt.Errorf("GET %s: bytes do not match %s", url, want)
	}
	return ttfb, total, nil
}

// BenchmarkCacheStorage compares the cache tier on S3 storage (a real
// SeaweedFS on loopback) with the filesystem driver, in one run: time to
// first byte and throughput of a cold blob, warm throughput, and warm
// throughput of three replicas on one bucket against one replica. Loopback
// on two cores is CPU-bound: the figures are ratios, not link speeds.
//
// Knob: SHOAL_BENCH_STORAGE_MIB (256).
func BenchmarkCacheStorage(b *testing.B) {
	if !onlyOnce(b) {
		return
	}
	bin := requireShoal(b)
	size := envInt("SHOAL_BENCH_STORAGE_MIB", 256) << 20
	s3 := harness.StartS3(b)
	redisURL := harness.StartRedis(b)
	h := hub.Start(b, hub.WithAnonymousLimit(hub.Unlimited))
	start := func(name string, args, env []string) *harness.ShoalCache {
		return harness.StartShoalCache(b, harness.CacheOptions{Bin: bin, Name: name, Upstreams: []string{h.Host() + "=" + h.URL()},
			Args: append(args, "--log-level", "warn"), Env: env})
	}
	fs := start("fs", nil, nil)
	s3Args := append(s3.CacheArgs(), "--redis-url", redisURL)
	onS3 := []*harness.ShoalCache{start("s3-0", s3Args, s3.CacheEnv()), start("s3-1", s3Args, s3.CacheEnv()), start("s3-2", s3Args, s3.CacheEnv())}
	c := newClient()
	url := func(cache *harness.ShoalCache, repo string, d digest.Digest) string {
		return cache.URL() + "/v2/" + repo + "/blobs/" + d.String() + "?ns=" + h.Host()
	}
	mibs := func(n int, d time.Duration) float64 { return float64(n) / (1 << 20) / d.Seconds() }

	fmt.Printf("%-58s %12s %12s %8s\n", fmt.Sprintf("CACHE STORAGE (%d MiB blob, loopback)", size>>20), "filesystem", "s3", "s3/fs")
	row := func(what string, fsv, s3v float64, unit string) {
		fmt.Printf("%-58s %10.1f%-2s %10.1f%-2s %7.2fx\n", what, fsv, unit, s3v, unit, s3v/fsv)
		fmt.Printf("RESULT storage/%s filesystem=%.1f%s s3=%.1f%s ratio=%.2f (no target): INFO\n", what, fsv, unit, s3v, unit, s3v/fsv)
	}

	// Cold: each contender gets its own blob, so both fetch upstream once.
	var ttfb, thr [2]float64
	blobs := [2]digest.Digest{}
	for i, cache := range []*harness.ShoalCache{fs, onS3[0]} {
		img, d := rawImage(b, size)
		repo := fmt.Sprintf("library/cold%d", i)
		h.Push(b, repo, "v1", img)
		blobs[i] = d
		t1, total, err := timedGET(c, url(cache, repo, d), d)
		if err != nil {
			b.Fatal(err)
		}
		ttfb[i], thr[i] = float64(t1.Microseconds())/1000, mibs(size, total)
		if n := h.BlobGETs(d); n != 1 {
			b.Errorf("%s: %d upstream GETs of the cold blob, want 1", cache.Name, n)
		}
	}
	row("cold blob: time to first byte", ttfb[0], ttfb[1], "ms")
	row("cold blob: throughput", thr[0], thr[1], "MiB/s")

	// Warm: the median of three GETs, once the blob is stored.
	warm := func(cache *harness.ShoalCache, repo string, d digest.Digest) float64 {
		waitFor(b, 5*time.Minute, "blob stored", func() error {
			resp, err := c.Head(url(cache, repo, d))
			if err != nil {
				return err
			}
			resp.Body.Close()
			if resp.StatusCode != http.StatusOK {
				return fmt.Errorf("HEAD: %s", resp.Status)
			}
			return nil
		})
		var v []float64
		for range 3 {
			_, total, err := timedGET(c, url(cache, repo, d), d)
			if err != nil {
				b.Fatal(err)
			}
			v = append(v, mibs(size, total))
		}
		return median(v)
	}
	wfs, ws3 := warm(fs, "library/cold0", blobs[0]), warm(onS3[0], "library/cold1", blobs[1])
	row("warm blob: throughput (median of 3)", wfs, ws3, "MiB/s")

	// Six clients at once on S3 storage: all on one replica, then spread
	// over three.
	h.ResetCounts()
	aggregate := func(rs []*harness.ShoalCache) float64 {
		const clients = 6
		var wg sync.WaitGroup
		errs := make(chan error, clients)
		start := time.Now()
		for i := range clients {
			wg.Go(func() {
				if _, _, err := timedGET(c, url(rs[i%len(rs)], "library/cold1", blobs[1]), blobs[1]); err != nil {
					errs <- err
				}
			})
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			b.Fatal(err)
		}
		return mibs(clients*size, time.Since(start))
	}
	three, one := aggregate(onS3), aggregate(onS3[:1])
	fmt.Printf("%-58s %12s %12s %8s\n", "WARM ON S3, 6 clients at once", "1 replica", "3 replicas", "3/1")
	fmt.Printf("%-58s %8.1fMiB/s %8.1fMiB/s %7.2fx\n", "aggregate throughput", one, three, three/one)
	fmt.Printf("RESULT storage/warm s3 aggregate 1 replica=%.1fMiB/s 3 replicas=%.1fMiB/s ratio=%.2f (no target): INFO\n", one, three, three/one)
	if n := h.Counts().BlobGET; n != 0 {
		b.Errorf("warm reads sent %d blob GETs upstream, want 0", n)
	}
}
