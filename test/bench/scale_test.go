package bench

import (
	"fmt"
	"io"
	"net/http"
	"os"
	"sort"
	"strings"
	"testing"
	"time"

	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/shoal-oci/shoal/test/harness"
)

// BenchmarkNodeScale starts SHOAL_BENCH_NODES (50) `shoal node` processes on
// loopback, each serving an OCI layout with SHOAL_BENCH_DIGESTS (2000)
// digests, default flags but for the PSK and addresses, and prints per node:
// ready time, idle CPU and RSS after the start-up has settled, and lookup
// to first byte of a 1 MiB blob only one other node holds (first ask and
// again), with failed lookups. It deletes a digest on one of its two
// holders and prints what requests for it cost. Then it SIGKILLs a holder
// of blobs two nodes hold and prints what requests for them cost at once
// and 10 s later.
//
// SHOAL_BENCH_NODE_ARGS adds flags to every node (to compare settings).
//
// Targets (issue 7): idle CPU <= 1% of a core and RSS <= 64 MiB per node,
// ready <= 10 s, lookup p50 <= 5 ms and p95 <= 20 ms, no failed lookups.
func BenchmarkNodeScale(b *testing.B) {
	if !onlyOnce(b) {
		return
	}
	bin := requireNode(b)
	n := envInt("SHOAL_BENCH_NODES", 50)
	digests := envInt("SHOAL_BENCH_DIGESTS", 2000)
	settle := time.Duration(envInt("SHOAL_BENCH_SETTLE_S", 300)) * time.Second
	idle := time.Duration(envInt("SHOAL_BENCH_IDLE_S", 60)) * time.Second

	// Node i holds: its own image of small layers (digests-5 of them), a
	// 1 MiB blob only it holds (own[i]), and a 1 MiB blob it shares with
	// node i-1 (pair[i], held by i and i+1).
	own := make([]ocispec.Descriptor, n)
	pair := make([]ocispec.Descriptor, n)
	dirs := make([]string, n)
	lays := make([]*ociLayout, n)
	t0 := time.Now()
	for i := range n {
		lay := newLayout(b, b.TempDir())
		ls := make([]ocispec.Descriptor, 0, digests-3)
		for j := range digests - 5 {
			ls = append(ls, lay.put(b, "application/vnd.oci.image.layer.v1.tar", fmt.Appendf(nil, "node %d layer %d", i, j)))
		}
		own[i] = lay.putRandom(b, 1<<20, uint64(1000+i))
		pair[i] = lay.putRandom(b, 1<<20, uint64(5000+i))
		prev := lay.putRandom(b, 1<<20, uint64(5000+(i+n-1)%n)) // node i-1's pair blob
		ls = append(ls, own[i], pair[i], prev)
		lay.manifests = append(lay.manifests, lay.addImageNoIndex(b, fmt.Sprintf("docker.io/library/scale%d:v1", i), ls))
		lay.writeIndex(b)
		dirs[i] = lay.dir
		lays[i] = lay
	}
	logf("BenchmarkNodeScale: %d layouts of %d digests written in %s", n, digests, time.Since(t0).Round(time.Millisecond))

	nodes := make([]*harness.ShoalNode, n)
	ready := make([]time.Duration, n)
	var boot []string
	for i := range n {
		start := time.Now()
		nodes[i] = harness.StartShoalNode(b, harness.NodeOptions{
			Bin: bin, Name: fmt.Sprintf("n%02d", i), LayoutDir: dirs[i], BootstrapPeers: boot,
			ProviderTTL: 30 * time.Minute, // the default
			Args:        append([]string{"--log-level", "info"}, strings.Fields(os.Getenv("SHOAL_BENCH_NODE_ARGS"))...),
		})
		ready[i] = time.Since(start)
		if len(boot) < 3 {
			boot = append(boot, nodes[i].RouterAddr)
		}
	}
	logf("  %d nodes ready; ready after start: %s", n, summary(ready))

	// Settle: the first provide of every key is start-up work, not idle
	// cost. Wait until the nodes' total CPU rate over 10 s windows stops
	// falling (two windows within 20% of each other), at most settle.
	total := func() float64 {
		var s float64
		for _, nd := range nodes {
			s += cpuSeconds(b, nd.PID())
		}
		return s
	}
	s0, prev := time.Now(), -1.0
	for time.Since(s0) < settle {
		c0 := total()
		time.Sleep(10 * time.Second)
		rate := (total() - c0) / 10
		logf("  settling: all nodes together use %.1f%% of a core", 100*rate)
		if prev >= 0 && rate >= 0.8*prev && rate <= 1.25*prev {
			break
		}
		prev = rate
	}
	logf("  settled after %s; measuring idle CPU over %s", time.Since(s0).Round(time.Second), idle)
	cpu0 := make([]float64, n)
	for i, nd := range nodes {
		cpu0[i] = cpuSeconds(b, nd.PID())
	}
	w0 := time.Now()
	time.Sleep(idle)
	wall := time.Since(w0).Seconds()
	cpu := make([]float64, n)
	rss := make([]float64, n)
	for i, nd := range nodes {
		cpu[i] = 100 * (cpuSeconds(b, nd.PID()) - cpu0[i]) / wall
		rss[i] = vmRSS(b, nd.PID())
	}
	logf("  idle CPU %% of a core per node: %s", summaryF(cpu, "%.2f"))
	logf("  VmRSS MiB per node: %s", summaryF(rss, "%.1f"))
	heap := make([]float64, n)
	for i, nd := range nodes {
		heap[i] = nd.Metric(b, "go_memstats_heap_inuse_bytes") / (1 << 20)
	}
	logf("  Go heap in use MiB per node: %s", summaryF(heap, "%.1f"))
	logf("  node %s: RssAnon %.1f MiB, RssFile %.1f MiB", nodes[n/2].Name, procStatus(b, nodes[n/2].PID(), "RssAnon:"), procStatus(b, nodes[n/2].PID(), "RssFile:"))

	client := newClient()
	ttfb := func(from *harness.ShoalNode, d ocispec.Descriptor) (time.Duration, error) {
		start := time.Now()
		resp, err := client.Get(blobURL(from.URL(), "library/scale", d.Digest))
		if err != nil {
			return 0, err
		}
		defer resp.Body.Close()
		var one [1]byte
		if _, err := io.ReadFull(resp.Body, one[:]); err != nil {
			return 0, fmt.Errorf("%s: %w", resp.Status, err)
		}
		took := time.Since(start)
		if resp.StatusCode != http.StatusOK {
			return 0, fmt.Errorf("GET from %s: %s", from.Name, resp.Status)
		}
		if _, err := io.Copy(io.Discard, resp.Body); err != nil {
			return 0, err
		}
		return took, nil
	}
	lookups := func(what string) []time.Duration {
		var ds []time.Duration
		failed := 0
		for i, nd := range nodes {
			d, err := ttfb(nd, own[(i+n/2)%n])
			if err != nil {
				failed++
				logf("    lookup from %s failed: %v", nd.Name, err)
				continue
			}
			ds = append(ds, d)
		}
		logf("  lookup to first byte, 1 MiB blob held by one other node, %s: %s; failed %d of %d", what, summary(ds), failed, n)
		return ds
	}
	first := lookups("first ask")
	again := lookups("asked again")

	// Content that arrives after the cluster formed: node j gets a new
	// image; once j advertises it, node i asks for its 1 MiB layer.
	var fresh []time.Duration
	freshFailed := 0
	for r := range 10 {
		j, i := (r*7+1)%n, (r*7+1+n/2)%n
		before := nodes[j].Metric(b, "shoal_node_advertised_keys")
		blob := lays[j].putRandom(b, 1<<20, uint64(9000+r))
		lays[j].manifests = append(lays[j].manifests, lays[j].addImageNoIndex(b, fmt.Sprintf("docker.io/library/fresh%d:v1", r), []ocispec.Descriptor{blob}))
		lays[j].writeIndex(b)
		waitFor(b, 30*time.Second, "the new image is advertised", func() error {
			if v := nodes[j].Metric(b, "shoal_node_advertised_keys"); v <= before {
				return fmt.Errorf("node %d advertises %v keys", j, v)
			}
			return nil
		})
		d, err := ttfb(nodes[i], blob)
		if err != nil {
			freshFailed++
			logf("    lookup of new content from %s failed: %v", nodes[i].Name, err)
			continue
		}
		fresh = append(fresh, d)
	}
	logf("  lookup to first byte of a 1 MiB blob another node got after the cluster formed, asked right after it advertised: %s; failed %d of 10", summary(fresh), freshFailed)
	viaCache, allLookups := 0.0, 0.0
	for _, nd := range nodes {
		viaCache += nd.Metric(b, "shoal_dht_lookups_total", `result="cache"`)
		allLookups += nd.Metric(b, "shoal_dht_lookups_total")
	}
	logf("  lookups answered from the provider cache (no DHT query), all nodes: %.0f of %.0f", viaCache, allLookups)

	// Withdrawal: nodes w and w2 get the same new image; once both
	// advertise it, w deletes it (index and blob). Requests for its layer
	// must all complete, from w2; a request that still reaches w costs one
	// 404 there, counted here from w's own metrics.
	w, w2 := n/4, n/4+n/2
	wdBlob := lays[w].putRandom(b, 1<<20, 7777)
	for _, j := range []int{w, w2} {
		if j != w {
			lays[j].putRandom(b, 1<<20, 7777)
		}
		before := nodes[j].Metric(b, "shoal_node_advertised_keys")
		lays[j].manifests = append(lays[j].manifests, lays[j].addImageNoIndex(b, "docker.io/library/withdrawn:v1", []ocispec.Descriptor{wdBlob}))
		lays[j].writeIndex(b)
		waitFor(b, 30*time.Second, "the shared image is advertised", func() error {
			if v := nodes[j].Metric(b, "shoal_node_advertised_keys"); v <= before {
				return fmt.Errorf("node %d advertises %v keys", j, v)
			}
			return nil
		})
	}
	before := nodes[w].Metric(b, "shoal_node_advertised_keys")
	lays[w].manifests = lays[w].manifests[:len(lays[w].manifests)-1]
	lays[w].writeIndex(b)
	if err := os.Remove(lays[w].blobPath(wdBlob.Digest)); err != nil {
		b.Fatal(err)
	}
	waitFor(b, 30*time.Second, "the deleted image is withdrawn", func() error {
		if v := nodes[w].Metric(b, "shoal_node_advertised_keys"); v >= before {
			return fmt.Errorf("node %d still advertises %v keys", w, v)
		}
		return nil
	})
	missesBefore := nodes[w].Metric(b, "shoal_node_requests_total", `source="miss"`)
	var withdrawn []time.Duration
	wdFailed := 0
	for r := range 10 {
		i := (w + 1 + r*3) % n
		if i == w || i == w2 {
			i = (i + 1) % n
		}
		d, err := ttfb(nodes[i], wdBlob)
		if err != nil {
			wdFailed++
			logf("    request for the withdrawn digest from %s failed: %v", nodes[i].Name, err)
			continue
		}
		withdrawn = append(withdrawn, d)
	}
	stale := nodes[w].Metric(b, "shoal_node_requests_total", `source="miss"`) - missesBefore
	logf("  digest deleted on one of its two holders, asked right after the withdrawal: %s; failed %d of 10; 404s the deleting node served %.0f", summary(withdrawn), wdFailed, stale)

	// Kill node k without notice; pair[k] is also held by node k+1.
	k := n / 3
	victim := nodes[k]
	victim.Kill()
	var afterKill, later []time.Duration
	failed := 0
	requesters := func(offsets ...int) []int {
		var out []int
		for _, o := range offsets {
			if i := (k + o) % n; i != k && i != (k+1)%n {
				out = append(out, i)
			}
		}
		return out
	}
	for _, i := range requesters(2, 4, 6) {
		d, err := ttfb(nodes[i], pair[k])
		if err != nil {
			failed++
			logf("    request after the kill failed: %v", err)
			continue
		}
		afterKill = append(afterKill, d)
	}
	time.Sleep(10 * time.Second)
	for _, i := range requesters(2, 3, 5, 7) {
		d, err := ttfb(nodes[i], pair[k])
		if err != nil {
			failed++
			logf("    request 10 s after the kill failed: %v", err)
			continue
		}
		later = append(later, d)
	}
	logf("  holder SIGKILLed: first requests %s; 10 s later %s; failed %d", summary(afterKill), summary(later), failed)

	p50, p95 := pct(first, 50), pct(first, 95)
	maxCPU, maxRSS, maxReady := maxF(cpu), maxF(rss), maxD(ready)
	result(b, "node/scale-idle-cpu", fmt.Sprintf("nodes=%d digests=%d idle-cpu max=%.2f%% median=%.2f%%", n, digests, maxCPU, medianF(cpu)), maxCPU/1, "<= 1% of a core per node", maxCPU <= 1)
	result(b, "node/scale-rss", fmt.Sprintf("VmRSS max=%.1f MiB median=%.1f MiB", maxRSS, medianF(rss)), maxRSS/64, "<= 64 MiB", maxRSS <= 64)
	result(b, "node/scale-ready", fmt.Sprintf("ready max=%s median=%s", maxReady.Round(time.Millisecond), medianD(ready).Round(time.Millisecond)), maxReady.Seconds()/10, "<= 10 s", maxReady <= 10*time.Second)
	result(b, "node/scale-lookup", fmt.Sprintf("first ask p50=%s p95=%s, again p50=%s p95=%s, failed=%d", ms(p50), ms(p95), ms(pct(again, 50)), ms(pct(again, 95)), 2*n-len(first)-len(again)), p95.Seconds()/0.020, "p50 <= 5 ms, p95 <= 20 ms, none failed", p50 <= 5*time.Millisecond && p95 <= 20*time.Millisecond && len(first)+len(again) == 2*n)
	fp50, fp95 := pct(fresh, 50), pct(fresh, 95)
	result(b, "node/scale-lookup-new", fmt.Sprintf("content added after start: p50=%s p95=%s failed=%d", ms(fp50), ms(fp95), freshFailed), fp95.Seconds()/0.020, "p50 <= 5 ms, p95 <= 20 ms, none failed", fp50 <= 5*time.Millisecond && fp95 <= 20*time.Millisecond && freshFailed == 0)
	result(b, "node/scale-withdrawn", fmt.Sprintf("deleted on 1 of 2 holders: max=%s, failed=%d, 404s at the deleting node=%.0f", ms(maxD(withdrawn)), wdFailed, stale), float64(wdFailed), "none failed; at most one extra round trip (a 404) each", wdFailed == 0 && stale <= float64(len(withdrawn)))
	result(b, "node/scale-killed-holder", fmt.Sprintf("first requests max=%s, 10 s later max=%s, failed=%d", ms(maxD(afterKill)), ms(maxD(later)), failed), maxD(later).Seconds()/0.020, "none failed; 10 s later as fast as any lookup", failed == 0 && maxD(later) <= 20*time.Millisecond)
}

func pct(ds []time.Duration, p int) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := append([]time.Duration(nil), ds...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	i := (len(s)*p + 99) / 100
	return s[min(max(i-1, 0), len(s)-1)]
}

func ms(d time.Duration) string { return fmt.Sprintf("%.1fms", float64(d)/1e6) }

func summary(ds []time.Duration) string {
	if len(ds) == 0 {
		return "none"
	}
	return fmt.Sprintf("p50 %s, p95 %s, max %s (n=%d)", ms(pct(ds, 50)), ms(pct(ds, 95)), ms(maxD(ds)), len(ds))
}

func summaryF(v []float64, f string) string {
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	parts := make([]string, len(s))
	for i, x := range s {
		parts[i] = fmt.Sprintf(f, x)
	}
	return fmt.Sprintf("median "+f+", max "+f+" (sorted: %s)", medianF(v), maxF(v), strings.Join(parts, " "))
}

func maxF(v []float64) float64 {
	m := 0.0
	for _, x := range v {
		m = max(m, x)
	}
	return m
}

func medianF(v []float64) float64 { return median(v) }

func maxD(ds []time.Duration) time.Duration {
	var m time.Duration
	for _, d := range ds {
		m = max(m, d)
	}
	return m
}

func medianD(ds []time.Duration) time.Duration { return pct(ds, 50) }
