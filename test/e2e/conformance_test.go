package e2e

import (
	"context"
	"os/exec"
	"regexp"
	"strconv"
	"testing"
	"time"

	"github.com/shoal-oci/shoal/test/harness"
)

// The OCI distribution-spec conformance suite, pull workflow, against a node
// seeded through containerd. The suite sends no ?ns=, so the node reads the
// names as docker.io's.
func TestConformance(t *testing.T) {
	suite := harness.Binary(t, "SHOAL_CONFORMANCE_BIN", "conformance.test")
	sites := startSites(t, harness.ContainerdV2)
	s := sites[0]
	const namespace, tag = "conformance/pull", "v1"
	img := harness.RandomImage(t, 2, 8<<10)
	importImage(t, s.ctrd, img, "docker.io/"+namespace+":"+tag)
	m, _, ls := imageDigests(t, img)
	eventually(t, 10*time.Second, "node serves the seeded tag", func() error {
		return headManifest(s, namespace, tag, m.String())
	})

	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, suite)
	cmd.Dir = t.TempDir() // it writes its report files here
	// This suite version reads the new OCI_* variables (the legacy
	// OCI_ROOT_URL/OCI_NAMESPACE/... still work but turn push tests on).
	// Read-only: pull APIs against preloaded content, nothing else.
	cmd.Env = append(cmd.Environ(),
		"OCI_REGISTRY="+s.shoal.RegistryAddr,
		"OCI_TLS=disabled",
		"OCI_REPO1="+namespace,
		"OCI_REPO2="+namespace,
		"OCI_RESULTS_DIR="+cmd.Dir,
		"OCI_API_PULL=true",
		"OCI_API_PUSH=false",
		"OCI_API_BLOBS_DELETE=false",
		"OCI_API_MANIFESTS_DELETE=false",
		"OCI_API_TAGS_DELETE=false",
		"OCI_API_TAGS_LIST=false",
		"OCI_API_REFERRER=false",
		"OCI_RO_DATA_TAGS="+tag,
		"OCI_RO_DATA_MANIFESTS="+m.String(),
		"OCI_RO_DATA_BLOBS="+ls[0].String()+" "+ls[1].String(),
	)
	out, err := cmd.CombinedOutput()
	// The suite may exit non-zero after its report (it can panic writing
	// its results file in read-only mode), so judge by the printed report.
	r, ok := conformanceSummary(string(out))
	if !ok {
		t.Fatalf("no summary in the conformance output (exit %v):\n%s", err, out)
	}
	t.Logf("conformance: result %s, %d passed, %d failed, %d errors (exit %v)", r.result, r.pass, r.fail, r.errors, err)
	if r.result != "Pass" || r.fail != 0 || r.errors != 0 || r.pass == 0 {
		t.Fatalf("conformance: result %s, %d passed, %d failed, %d errors:\n%s", r.result, r.pass, r.fail, r.errors, out)
	}
	requireNoPanic(t, s)
}

var (
	resultRE = regexp.MustCompile(`(?m)^\s*OCI Conformance Result: (\w+)`)
	countRE  = regexp.MustCompile(`(?m)^\s*(Pass|FAIL|Error)\.+:\s+(\d+)\s*$`)
)

type conformanceResult struct {
	result             string
	pass, fail, errors int
}

// conformanceSummary reads the report's "OCI Conformance Result: Pass"
// line and the Pass/FAIL/Error counts that follow it.
func conformanceSummary(out string) (conformanceResult, bool) {
	var r conformanceResult
	loc := resultRE.FindStringSubmatchIndex(out)
	if loc == nil {
		return r, false
	}
	r.result = out[loc[2]:loc[3]]
	rest := out[loc[1]:]
	seen := 0
	for _, m := range countRE.FindAllStringSubmatch(rest, 3) {
		n, _ := strconv.Atoi(m[2])
		switch m[1] {
		case "Pass":
			r.pass = n
		case "FAIL":
			r.fail = n
		case "Error":
			r.errors = n
		}
		seen++
	}
	return r, seen == 3
}
