package cache_e2e

import (
	"context"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/shoal-oci/shoal/test/harness"
	"github.com/shoal-oci/shoal/test/hub"
)

// TestDistributionSpecConformancePull runs the OCI distribution-spec
// conformance suite (pull) against `shoal cache`. The suite sends no ?ns=,
// so the cache serves it as docker.io, mapped here to the hub. In this
// read-only mode the suite panics writing its results file after printing
// its report, so the verdict comes from the report.
func TestDistributionSpecConformancePull(t *testing.T) {
	bin := harness.Binary(t, "SHOAL_CONFORMANCE_BIN", "conformance.test")
	h := hub.Start(t)
	img := harness.RandomImage(t, 2, 4096)
	md := h.Push(t, "library/conformance", "v1", img)
	layers, _ := img.Layers()
	ld, _ := layers[0].Digest()
	c := startCache(t, h, cacheOpts{upstreams: []string{"docker.io=" + h.URL()}})

	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin)
	cmd.Dir = t.TempDir()
	cmd.Env = append(harness.FilteredEnv("OCI_"),
		"OCI_REGISTRY="+c.addr,
		"OCI_TLS=disabled",
		"OCI_REPO1=library/conformance",
		"OCI_REPO2=library/conformance2",
		"OCI_API_PULL=true",
		"OCI_API_PUSH=false",
		"OCI_API_BLOBS_DELETE=false",
		"OCI_API_MANIFESTS_DELETE=false",
		"OCI_API_TAGS_DELETE=false",
		"OCI_API_TAGS_LIST=false",
		"OCI_API_REFERRER=false",
		"OCI_RO_DATA_TAGS=v1",
		"OCI_RO_DATA_MANIFESTS="+md.String(),
		"OCI_RO_DATA_BLOBS="+ld.String(),
		"OCI_RESULTS_DIR="+filepath.Join(cmd.Dir, "results"),
		"OCI_LOG=warn",
	)
	cmd.WaitDelay = 5 * time.Second
	out, err := cmd.CombinedOutput()
	report := string(out)
	passed, failed := countResults(report)
	t.Logf("conformance: %d passed, %d failed (exit: %v)", passed, failed, err)
	if failed != 0 || passed == 0 {
		t.Fatalf("conformance suite: %d passed, %d failed\n%s", passed, failed, report)
	}
}

// countResults reads the suite's summary:
//
//	OCI Conformance Result: Pass
//	  Pass..........................:         10
//	  FAIL..........................:          0
//	  Error.........................:          0
//
// Errors count as failures; a report that cannot be read is a failure.
func countResults(report string) (passed, failed int) {
	num := func(label string) int {
		m := regexp.MustCompile(`(?m)^\s*` + label + `\.+:\s+(\d+)\s*$`).FindStringSubmatch(report)
		if m == nil {
			return -1
		}
		n, _ := strconv.Atoi(m[1])
		return n
	}
	passed, fail, errs := num("Pass"), num("FAIL"), num("Error")
	if passed < 0 || fail < 0 || errs < 0 || !strings.Contains(report, "OCI Conformance Result: Pass") {
		return max(passed, 0), max(fail, 0) + max(errs, 0) + 1
	}
	return passed, fail + errs
}
