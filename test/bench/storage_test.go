package bench

import (
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

// BenchmarkCacheReplicasLAN: warm serving from S3 storage, one replica
// against three, with the wire as the limit. Each replica's uplink is its
// own (an HTB class per replica on the bridge, at SHOAL_BENCH_REPLICAS_RATE,
// 100mbit), as each replica pod sends through its own node's NIC in a
// cluster. Six clients, each `crane blob` in its own network namespace, get
// one warm SHOAL_BENCH_REPLICAS_MIB (64) MiB blob at the same moment: all
// from one replica, then spread over three. SeaweedFS and Redis sit beside
// the replicas in the root namespace, unshaped, as a cluster's object store
// and Redis are not behind a replica's uplink.
func BenchmarkCacheReplicasLAN(b *testing.B) {
	if !onlyOnce(b) {
		return
	}
	bin := requireShoal(b)
	crane := harness.Binary(b, "SHOAL_CRANE_BIN", "crane")
	rate := envString("SHOAL_BENCH_REPLICAS_RATE", "100mbit")
	size := envInt("SHOAL_BENCH_REPLICAS_MIB", 64) << 20
	const clients = 6
	hosts := startLAN(b, clients, rate)
	s3 := harness.StartS3(b)
	redisURL := harness.StartRedis(b)
	h := hub.Start(b, hub.WithAnonymousLimit(hub.Unlimited))
	args := append(s3.CacheArgs(), "--redis-url", redisURL, "--log-level", "warn")
	var replicas []*harness.ShoalCache
	for i := range 3 {
		replicas = append(replicas, harness.StartShoalCache(b, harness.CacheOptions{Bin: bin, Name: fmt.Sprintf("r%d", i),
			ListenIP: "10.77.0.1", Upstreams: []string{"docker.io=" + h.URL()}, Args: args, Env: s3.CacheEnv()}))
	}
	var ports []string
	for _, r := range replicas {
		_, port, err := net.SplitHostPort(r.Addr)
		if err != nil {
			b.Fatal(err)
		}
		ports = append(ports, port)
	}
	shapePerPort(b, rate, "shoalbr0", ports)

	img, d := rawImage(b, size)
	h.Push(b, "library/warm", "v1", img)
	// Warm: one cold fetch (through r0, into S3), then every replica has it.
	c := newClient()
	for _, r := range replicas {
		waitFor(b, 5*time.Minute, "blob stored", func() error {
			_, _, err := timedGET(c, r.URL()+"/v2/library/warm/blobs/"+d.String(), d)
			return err
		})
	}
	h.ResetCounts()
	logf("BenchmarkCacheReplicasLAN: %d clients, a warm %d MiB blob on S3, each replica's uplink at %s", clients, size>>20, rate)

	aggregate := func(rs []*harness.ShoalCache) (float64, []time.Duration) {
		took := make([]time.Duration, clients)
		errs := make([]error, clients)
		var wg sync.WaitGroup
		start := time.Now()
		for i := range clients {
			wg.Go(func() {
				ref := rs[i%len(rs)].Addr + "/library/warm@" + d.String()
				t0 := time.Now()
				out, err := exec.Command("ip", "netns", "exec", hosts[i].ns, "sh", "-c", crane+" blob --insecure "+ref+" | sha256sum").CombinedOutput()
				took[i] = time.Since(t0)
				if err == nil && !strings.HasPrefix(string(out), d.Encoded()) {
					err = fmt.Errorf("sha256 %s", strings.TrimSpace(string(out)))
				}
				if err != nil {
					errs[i] = fmt.Errorf("client %d via %s: %v\n%s", i, ref, err, out)
				}
			})
		}
		wg.Wait()
		for _, err := range errs {
			if err != nil {
				b.Fatal(err)
			}
		}
		return float64(clients*size) / (1 << 20) / time.Since(start).Seconds(), took
	}
	secs := func(ds []time.Duration) string {
		var s []string
		for _, d := range ds {
			s = append(s, fmt.Sprintf("%.1f", d.Seconds()))
		}
		return strings.Join(s, " ")
	}
	one, tookOne := aggregate(replicas[:1])
	logf("  1 replica: %.1f MiB/s in all; per client s: %s", one, secs(tookOne))
	three, tookThree := aggregate(replicas)
	logf("  3 replicas: %.1f MiB/s in all; per client s: %s", three, secs(tookThree))
	var mbit float64
	fmt.Sscanf(rate, "%fmbit", &mbit)
	link := mbit * 1e6 / 8 / (1 << 20)
	result(b, "cache/replicas-warm-lan", fmt.Sprintf("1 replica %.1f MiB/s (%.2f of its uplink), 3 replicas %.1f MiB/s (%.2f of theirs)", one, one/link, three, three/(3*link)),
		three/one, ">= 2.5x (each replica adds its uplink)", three/one >= 2.5)
	if n := h.Counts().BlobGET; n != 0 {
		b.Errorf("warm reads sent %d blob GETs upstream, want 0", n)
	}
}

// shapePerPort gives each listed TCP source port its own HTB class at rate
// on device d's egress, so that each server behind one device sends as if
// through its own link; other traffic is not limited.
func shapePerPort(b *testing.B, rate, d string, ports []string) {
	b.Helper()
	tc := func(args ...string) { b.Helper(); runTC(b, []string{"tc"}, args...) }
	tc("qdisc", "replace", "dev", d, "root", "handle", "1:", "htb", "default", "99")
	tc("class", "add", "dev", d, "parent", "1:", "classid", "1:99", "htb", "rate", "10gbit")
	for i, p := range ports {
		id := fmt.Sprintf("1:%d", 10+i)
		tc("class", "add", "dev", d, "parent", "1:", "classid", id, "htb", "rate", rate, "ceil", rate, "burst", "256kb")
		tc("qdisc", "add", "dev", d, "parent", id, "pfifo", "limit", "128")
		tc("filter", "add", "dev", d, "parent", "1:", "protocol", "ip", "prio", "1", "u32", "match", "ip", "sport", p, "0xffff", "flowid", id)
	}
}
