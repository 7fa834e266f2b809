package bench

import (
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/shoal-oci/shoal/test/harness"
)

// envInt reads an integer knob, e.g. SHOAL_BENCH_ROUNDS.
func envInt(name string, def int) int {
	if v, err := strconv.Atoi(os.Getenv(name)); err == nil && v > 0 {
		return v
	}
	return def
}

func rounds() int { return envInt("SHOAL_BENCH_ROUNDS", 5) }

// waitFor retries f every 100ms until it succeeds or timeout passes.
func waitFor(b *testing.B, timeout time.Duration, what string, f func() error) {
	b.Helper()
	harness.Eventually(b, timeout, what, f)
}

// BenchmarkNodeBlob serves one large blob (1 GiB; SHOAL_BENCH_BLOB_MIB) three
// ways in interleaved rounds: nginx (sendfile on) from the file, shoal node A
// from its OCI layout (local store, sendfile), and shoal node B, which holds
// nothing and relays from A after a DHT lookup (one peer hop). Targets:
// shoal/nginx >= 0.9 and peer/local >= 0.9.
func BenchmarkNodeBlob(b *testing.B) {
	if !onlyOnce(b) {
		return
	}
	bin := requireNode(b)
	size := int64(envInt("SHOAL_BENCH_BLOB_MIB", 1024)) << 20

	lay := newLayout(b, b.TempDir())
	blob := lay.putRandom(b, size, 1)
	lay.addImage(b, "docker.io/library/bench:blob", []ocispecDescriptor{blob})
	empty := newLayout(b, b.TempDir())

	nginx := startNginx(b, lay.dir+"/blobs/sha256")
	a := harness.StartShoalNode(b, harness.NodeOptions{Bin: bin, Name: "A", LayoutDir: lay.dir, Args: []string{"--log-level", "info"}})
	bn := harness.StartShoalNode(b, harness.NodeOptions{Bin: bin, Name: "B", LayoutDir: empty.dir, BootstrapPeers: []string{a.RouterAddr}, Args: []string{"--log-level", "info"}})
	bv := harness.StartShoalNode(b, harness.NodeOptions{Bin: bin, Name: "Bverify", LayoutDir: newLayout(b, b.TempDir()).dir, BootstrapPeers: []string{a.RouterAddr}, Args: []string{"--log-level", "info", "--verify-blobs"}})
	fwd := startForwarder(b, a.RegistryAddr)
	ufwd := startUserspaceForwarder(b, a.RegistryAddr)

	c := newClient()
	urlA := blobURL(a.URL(), "library/bench", blob.Digest)
	urlB := blobURL(bn.URL(), "library/bench", blob.Digest)
	urlV := blobURL(bv.URL(), "library/bench", blob.Digest)
	urlF := blobURL("http://"+fwd, "library/bench", blob.Digest)
	urlU := blobURL("http://"+ufwd, "library/bench", blob.Digest)
	for _, u := range []string{urlB, urlV} {
		waitFor(b, 30*time.Second, "B finds the blob on A", func() error {
			st, err := head(c, u)
			if err != nil {
				return err
			}
			if st != http.StatusOK {
				return fmt.Errorf("HEAD %s: %d", u, st)
			}
			return nil
		})
	}
	// Warm the page cache and the connections once, unmeasured.
	for _, u := range []string{nginx + "/" + blob.Digest.Encoded(), urlA, urlB, urlV, urlF, urlU} {
		if _, err := download(c, u, size); err != nil {
			b.Fatal(err)
		}
	}
	logf("BenchmarkNodeBlob: %d MiB, %d rounds, MiB/s (higher is better)", size>>20, rounds())
	meds := sideBySide(b, rounds(), "MiB/s",
		contender{"nginx", func() (float64, error) { return download(c, nginx+"/"+blob.Digest.Encoded(), size) }},
		contender{"shoal-local", func() (float64, error) { return download(c, urlA, size) }},
		contender{"shoal-peer", func() (float64, error) { return download(c, urlB, size) }},
		contender{"peer-verify", func() (float64, error) { return download(c, urlV, size) }},
		contender{"tcp-splice-hop", func() (float64, error) { return download(c, urlF, size) }},
		contender{"userspace-copy-hop", func() (float64, error) { return download(c, urlU, size) }},
	)
	local := meds[1] / meds[0]
	result(b, "node/local-vs-nginx", fmt.Sprintf("shoal=%.0f nginx=%.0f MiB/s", meds[1], meds[0]), local, ">= 0.9", local >= 0.9)
	hop := meds[2] / meds[1]
	result(b, "node/peer-hop-vs-local", fmt.Sprintf("peer=%.0f local=%.0f MiB/s", meds[2], meds[1]), hop, ">= 0.9", hop >= 0.9)
	v := meds[3] / meds[1]
	result(b, "node/peer-verify-vs-local", fmt.Sprintf("peer(--verify-blobs)=%.0f local=%.0f MiB/s", meds[3], meds[1]), v, ">= 0.9", v >= 0.9)
	ceil := meds[4] / meds[1]
	result(b, "node/bare-splice-hop-vs-local", fmt.Sprintf("hop=%.0f local=%.0f MiB/s", meds[4], meds[1]), ceil, "(ceiling, informative)", true)
	rel := meds[2] / meds[4]
	result(b, "node/peer-vs-bare-splice-hop", fmt.Sprintf("peer=%.0f hop=%.0f MiB/s", meds[2], meds[4]), rel, "(informative)", true)
	us := meds[5] / meds[1]
	result(b, "node/userspace-copy-hop-vs-local", fmt.Sprintf("hop=%.0f local=%.0f MiB/s", meds[5], meds[1]), us, "(a 32 KiB copy-loop relay, informative)", true)
	gain := meds[2] / meds[5]
	result(b, "node/peer-vs-userspace-copy-hop", fmt.Sprintf("peer=%.0f copy-loop=%.0f MiB/s", meds[2], meds[5]), gain, "(informative)", true)
	if dir := os.Getenv("SHOAL_BENCH_PERF_DIR"); dir != "" {
		perfRecord(b, dir, "peer-B", bn.PID(), func() error { _, err := download(c, urlB, size); return err })
		perfRecord(b, dir, "peer-verify-B", bv.PID(), func() error { _, err := download(c, urlV, size); return err })
		perfRecord(b, dir, "peer-A", a.PID(), func() error { _, err := download(c, urlB, size); return err })
		perfRecord(b, dir, "local-A", a.PID(), func() error { _, err := download(c, urlA, size); return err })
	}
	if v := bn.Metric(b, "shoal_node_served_bytes_total", `source="peer"`); v < float64(size) {
		b.Fatalf("node B served %v bytes from peers, want at least %d: the peer path was not measured", v, size)
	}
}

// perfRecord runs `perf record -g` on pid while work runs, writing
// dir/<name>.data; read it with `perf report -i dir/<name>.data`. It skips
// quietly when perf is missing.
func perfRecord(b *testing.B, dir, name string, pid int, work func() error) {
	b.Helper()
	perf, err := exec.LookPath("perf")
	if err != nil {
		logf("perf not found; no profile for %s", name)
		return
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		b.Fatal(err)
	}
	out := filepath.Join(dir, name+".data")
	cmd := exec.Command(perf, "record", "-g", "-F", "999", "-p", strconv.Itoa(pid), "-o", out)
	cmd.Stdout, cmd.Stderr = io.Discard, io.Discard
	if err := cmd.Start(); err != nil {
		logf("perf record: %v", err)
		return
	}
	time.Sleep(500 * time.Millisecond) // let perf attach
	start := time.Now()
	werr := work()
	took := time.Since(start)
	_ = cmd.Process.Signal(syscall.SIGINT)
	_ = cmd.Wait()
	if werr != nil {
		b.Fatal(werr)
	}
	logf("perf profile of %s (pid %d, %s of work): %s", name, pid, took.Round(time.Millisecond), out)
}

// BenchmarkNodeIdleRSS starts a node whose OCI layout holds 100 images of
// 98 small layers each (10,000 digests plus 100 tags), with one peer to
// advertise to, waits until every key is advertised and the node has settled,
// and reads its VmRSS. Target: <= 64 MiB.
func BenchmarkNodeIdleRSS(b *testing.B) {
	if !onlyOnce(b) {
		return
	}
	bin := requireNode(b)
	const images, layersPer = 100, 98
	lay := newLayout(b, b.TempDir())
	for i := 0; i < images; i++ {
		ls := make([]ocispecDescriptor, layersPer)
		for j := range ls {
			ls[j] = lay.put(b, "application/vnd.oci.image.layer.v1.tar", []byte(fmt.Sprintf("layer %d/%d", i, j)))
		}
		lay.manifests = append(lay.manifests, lay.addImageNoIndex(b, fmt.Sprintf("docker.io/library/idle%d:v1", i), ls))
	}
	lay.writeIndex(b)
	wantKeys := float64(images*(layersPer+2) + images) // digests + tags
	peer := harness.StartShoalNode(b, harness.NodeOptions{Bin: bin, Name: "peer", LayoutDir: newLayout(b, b.TempDir()).dir, Args: []string{"--log-level", "info"}})
	n := harness.StartShoalNode(b, harness.NodeOptions{Bin: bin, Name: "idle", LayoutDir: lay.dir, BootstrapPeers: []string{peer.RouterAddr},
		ProviderTTL: time.Minute, Args: []string{"--log-level", "info"}})
	start := time.Now()
	waitFor(b, 2*time.Minute, "all keys advertised", func() error {
		v, err := n.MetricErr("shoal_node_advertised_keys")
		if err != nil {
			return err
		}
		if v != wantKeys {
			return fmt.Errorf("advertised %v keys, want %v", v, wantKeys)
		}
		return nil
	})
	logf("BenchmarkNodeIdleRSS: %v keys advertised after %s; settling", wantKeys, time.Since(start).Round(time.Millisecond))
	settle := time.Duration(envInt("SHOAL_BENCH_SETTLE_S", 15)) * time.Second
	var samples []float64
	cpu0, wall0 := cpuSeconds(b, n.PID()), time.Now()
	for end := time.Now().Add(settle); time.Now().Before(end); time.Sleep(time.Second) {
		samples = append(samples, vmRSS(b, n.PID()))
	}
	// Keys are re-provided every provider TTL/2 (30s here): settle past one
	// cycle (SHOAL_BENCH_SETTLE_S=65) to see what keeping them alive costs.
	cpuShare := (cpuSeconds(b, n.PID()) - cpu0) / time.Since(wall0).Seconds()
	logf("  CPU while idle: %.1f%% of one core over %s (provider TTL 1m, re-provide every 30s)", 100*cpuShare, time.Since(wall0).Round(time.Second))
	rss := vmRSS(b, n.PID())
	peak := vmHWM(b, n.PID())
	logf("  VmRSS samples while settling (MiB): %v", fmtList(samples))
	base := vmRSS(b, peer.PID())
	anon, file := procStatus(b, n.PID(), "RssAnon:"), procStatus(b, n.PID(), "RssFile:")
	banon, bfile := procStatus(b, peer.PID(), "RssAnon:"), procStatus(b, peer.PID(), "RssFile:")
	logf("  idle node: RssAnon=%.1f RssFile=%.1f MiB; peer with 0 keys: RssAnon=%.1f RssFile=%.1f MiB", anon, file, banon, bfile)
	result(b, "node/idle-rss-10k-keys", fmt.Sprintf("VmRSS=%.1f MiB (anon %.1f, file %.1f) VmHWM=%.1f MiB keys=%v (peer with 0 keys: VmRSS=%.1f MiB)", rss, anon, file, peak, wantKeys, base), rss/64, "VmRSS <= 64 MiB (ratio = RSS/64MiB <= 1)", rss <= 64)
	b.ReportMetric(rss, "MiB-RSS")
}

// cpuSeconds is a process's user+system CPU time from /proc/<pid>/stat.
func cpuSeconds(b *testing.B, pid int) float64 {
	b.Helper()
	raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		b.Fatal(err)
	}
	// Fields after the command name, which is in parentheses and may hold spaces.
	f := strings.Fields(string(raw[strings.LastIndexByte(string(raw), ')')+1:]))
	ut, _ := strconv.ParseFloat(f[11], 64) // utime: field 14 overall
	st, _ := strconv.ParseFloat(f[12], 64) // stime: field 15
	return (ut + st) / 100                 // clock ticks (USER_HZ = 100)
}

func fmtList(v []float64) string {
	s := make([]string, len(v))
	for i, x := range v {
		s[i] = fmt.Sprintf("%.1f", x)
	}
	return strings.Join(s, " ")
}

func vmRSS(b *testing.B, pid int) float64 { return procStatus(b, pid, "VmRSS:") }
func vmHWM(b *testing.B, pid int) float64 { return procStatus(b, pid, "VmHWM:") }

// procStatus reads a kB field of /proc/<pid>/status, in MiB.
func procStatus(b *testing.B, pid int, field string) float64 {
	b.Helper()
	raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		b.Fatalf("read status of %d: %v", pid, err)
	}
	for _, line := range strings.Split(string(raw), "\n") {
		if strings.HasPrefix(line, field) {
			f := strings.Fields(line)
			kb, err := strconv.ParseFloat(f[1], 64)
			if err != nil {
				b.Fatalf("%s: %v", line, err)
			}
			return kb / 1024
		}
	}
	b.Fatalf("no %s in /proc/%d/status", field, pid)
	return 0
}
