package bench

import (
	"flag"
	"fmt"
	"os"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/shoal-oci/shoal/test/harness"
)

// shoalBin is the shoal binary the benchmarks run; built once in TestMain
// when benchmarks were asked for, or taken from SHOAL_BENCH_BIN.
var (
	shoalBin string
	nodeBin  string // the node image's build: -tags nocloud,nocache
	buildErr error
)

func TestMain(m *testing.M) {
	flag.Parse()
	if f := flag.Lookup("test.bench"); f != nil && f.Value.String() != "" {
		shoalBin = os.Getenv("SHOAL_BENCH_BIN")
		if shoalBin == "" {
			dir, err := os.MkdirTemp("", "shoal-bench-bin-")
			if err != nil {
				fmt.Fprintln(os.Stderr, "bench:", err)
				os.Exit(1)
			}
			defer os.RemoveAll(dir)
			// The build the image ships as /shoal (the cache tier), with the
			// object-storage drivers.
			shoalBin, buildErr = harness.BuildShoal(dir, "-race=false")
		}
		nodeBin = os.Getenv("SHOAL_BENCH_NODE_BIN")
		if nodeBin == "" && buildErr == nil {
			dir, err := os.MkdirTemp("", "shoal-bench-node-")
			if err != nil {
				fmt.Fprintln(os.Stderr, "bench:", err)
				os.Exit(1)
			}
			defer os.RemoveAll(dir)
			nodeBin, buildErr = harness.BuildShoal(dir, "-race=false", "-tags", "nocloud,nocache")
		}
	}
	code := m.Run()
	os.Exit(code)
}

// requireShoal returns the shoal binary: a failed build fails the
// benchmark; with no binary at all (not run with -bench) it skips.
func requireShoal(b *testing.B) string {
	b.Helper()
	if buildErr != nil {
		b.Fatalf("build shoal: %v", buildErr)
	}
	if shoalBin == "" {
		b.Skip("no shoal binary (set SHOAL_BENCH_BIN or run with -bench)")
	}
	return shoalBin
}

// requireNode returns the node image's build of shoal (no cache tier), or
// skips the benchmark.
func requireNode(b *testing.B) string {
	b.Helper()
	requireShoal(b)
	if nodeBin == "" {
		b.Skip("no node binary (set SHOAL_BENCH_NODE_BIN or run with -bench)")
	}
	return nodeBin
}

// onlyOnce makes a benchmark run its own rounds exactly once, whatever b.N
// the framework asks for: the figures are side-by-side ratios, not ns/op.
func onlyOnce(b *testing.B) bool {
	b.Helper()
	return b.N == 1
}

// contender is one side of a comparison: run performs one measurement and
// returns its figure (higher is better unless the comparison says so).
type contender struct {
	name string
	run  func() (float64, error)
}

// sideBySide runs the contenders in interleaved rounds (A, B, A, B, ...),
// alternating which goes first each round, and returns each one's median.
func sideBySide(b *testing.B, rounds int, unit string, cs ...contender) []float64 {
	b.Helper()
	vals := make([][]float64, len(cs))
	for r := 0; r < rounds; r++ {
		order := make([]int, len(cs))
		for i := range order {
			order[i] = i
		}
		if r%2 == 1 { // alternate who goes first
			for i, j := 0, len(order)-1; i < j; i, j = i+1, j-1 {
				order[i], order[j] = order[j], order[i]
			}
		}
		var line []string
		for _, i := range order {
			v, err := cs[i].run()
			if err != nil {
				b.Fatalf("round %d, %s: %v", r+1, cs[i].name, err)
			}
			vals[i] = append(vals[i], v)
			line = append(line, fmt.Sprintf("%s=%.3f", cs[i].name, v))
		}
		logf("  round %d: %s %s", r+1, strings.Join(line, " "), unit)
	}
	meds := make([]float64, len(cs))
	for i := range cs {
		meds[i] = median(vals[i])
	}
	return meds
}

func median(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

// logf prints a progress line to stdout at once (b.Logf only shows at the end).
func logf(format string, args ...any) {
	fmt.Printf("%s "+format+"\n", append([]any{time.Now().Format("15:04:05")}, args...)...)
}

// result prints one RESULT line that run.sh collects: both figures, the
// ratio, the target and whether it is met.
func result(b *testing.B, name, detail string, ratio float64, target string, pass bool) {
	b.Helper()
	verdict := "FAIL"
	if pass {
		verdict = "PASS"
	}
	fmt.Printf("RESULT %-28s %s ratio=%.3f target %s: %s\n", name, detail, ratio, target, verdict)
	b.ReportMetric(ratio, "ratio")
}
