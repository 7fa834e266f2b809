package chart

import (
	"bufio"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/shoal-oci/shoal/test/harness"
	"github.com/shoal-oci/shoal/test/hub"
)

var metricName = regexp.MustCompile(`\bshoal_[a-z0-9_]+`)

// dashboardQueries returns every PromQL string in a dashboard: panel targets
// and templating queries.
func dashboardQueries(t *testing.T, path string) (title string, queries []string) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var d struct {
		Title  string `json:"title"`
		UID    string `json:"uid"`
		Panels []struct {
			Title   string `json:"title"`
			Type    string `json:"type"`
			Targets []struct {
				Expr string `json:"expr"`
			} `json:"targets"`
		} `json:"panels"`
		Templating struct {
			List []struct {
				Definition string `json:"definition"`
			} `json:"list"`
		} `json:"templating"`
	}
	if err := json.Unmarshal(b, &d); err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	if d.UID == "" || d.Title == "" {
		t.Errorf("%s: no uid or title", path)
	}
	for _, p := range d.Panels {
		if p.Type == "row" {
			continue
		}
		if len(p.Targets) == 0 {
			t.Errorf("%s: panel %q has no query", path, p.Title)
		}
		for _, tg := range p.Targets {
			if !metricName.MatchString(tg.Expr) {
				t.Errorf("%s: panel %q query uses no shoal metric: %s", path, p.Title, tg.Expr)
			}
			queries = append(queries, tg.Expr)
		}
	}
	for _, v := range d.Templating.List {
		queries = append(queries, v.Definition)
	}
	return d.Title, queries
}

// TestDashboardsUseExportedMetrics runs a real shoal node (on a real
// containerd, with the DHT) and a real shoal cache in front of the fake
// Docker Hub, drives pulls through them (a cold pull, a stale serve during an
// outage), scrapes both /metrics endpoints, and checks that every metric
// name in the dashboards is one the binaries export.
func TestDashboardsUseExportedMetrics(t *testing.T) {
	want := map[string][]string{} // metric name -> dashboards using it
	titles := map[string]bool{}
	files, _ := filepath.Glob(filepath.Join(chartDir, "dashboards", "*.json"))
	for _, f := range files {
		title, qs := dashboardQueries(t, f)
		titles[title] = true
		for _, q := range qs {
			for _, n := range metricName.FindAllString(q, -1) {
				want[n] = append(want[n], filepath.Base(f))
			}
		}
	}
	for _, tt := range []string{"shoal overview", "Docker Hub budget"} {
		if !titles[tt] {
			t.Errorf("no dashboard titled %q (have %v)", tt, titles)
		}
	}
	if len(want) < 20 {
		t.Fatalf("dashboards use only %d metric names", len(want))
	}

	bin := shoalBinary(t)
	ctrd := harness.StartContainerd(t, harness.ContainerdV2)
	h := hub.Start(t)
	h.Push(t, "library/alpine", "3.20", hub.Image(t, 2048, 2))

	cache := harness.StartShoalCache(t, harness.CacheOptions{Bin: bin, Upstreams: []string{"docker.io=" + h.URL()},
		Args: []string{"--tag-freshness=1s", "--upstream-timeout=2s", "--log-level=warn"}})
	node := harness.StartShoalNode(t, harness.NodeOptions{Bin: bin, Containerd: ctrd,
		Args: []string{"--cache-url=" + cache.URL(), "--log-level=warn"}})
	nodeAddr, cacheAddr := node.RegistryAddr, cache.Addr

	// A cold pull through the node: tag and manifest via the cache tier,
	// then every blob.
	manifest := get(t, "http://"+nodeAddr+"/v2/library/alpine/manifests/3.20?ns=docker.io", http.StatusOK)
	var m struct {
		Config struct{ Digest string }   `json:"config"`
		Layers []struct{ Digest string } `json:"layers"`
	}
	if err := json.Unmarshal(manifest, &m); err != nil {
		t.Fatalf("manifest: %v", err)
	}
	for _, d := range append([]string{m.Config.Digest}, digests(m.Layers)...) {
		get(t, "http://"+nodeAddr+"/v2/library/alpine/blobs/"+d+"?ns=docker.io", http.StatusOK)
	}
	// A stale serve: the tag is past its freshness and the upstream is down.
	time.Sleep(1200 * time.Millisecond)
	h.SetOutage(true)
	get(t, "http://"+cacheAddr+"/v2/library/alpine/manifests/3.20?ns=docker.io", http.StatusOK)
	h.SetOutage(false)

	have := map[string]bool{}
	for _, u := range []string{"http://" + node.MetricsAddr + "/metrics", "http://" + cache.MetricsAddr + "/metrics"} {
		scrape(t, u, have)
	}
	var missing []string
	for n, where := range want {
		if !have[n] {
			missing = append(missing, fmt.Sprintf("%s (used in %v)", n, where))
		}
	}
	sort.Strings(missing)
	if len(missing) > 0 {
		t.Errorf("dashboards use metrics the binaries do not export:\n  %s", strings.Join(missing, "\n  "))
	}
	checkDashboardsOnPrometheus(t, node.MetricsAddr, cache.MetricsAddr)
}

func digests(ls []struct{ Digest string }) []string {
	var out []string
	for _, l := range ls {
		out = append(out, l.Digest)
	}
	return out
}

func tail(s string, n int) string {
	if len(s) > n {
		return s[len(s)-n:]
	}
	return s
}

func get(t *testing.T, url string, status int) []byte {
	t.Helper()
	req, _ := http.NewRequest(http.MethodGet, url, nil)
	req.Header.Set("Accept", "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json")
	c := &http.Client{Timeout: 15 * time.Second}
	resp, err := c.Do(req)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	var b strings.Builder
	if _, err := bufio.NewReader(resp.Body).WriteTo(&b); err != nil {
		t.Fatalf("GET %s: body: %v", url, err)
	}
	if resp.StatusCode != status {
		t.Fatalf("GET %s = %d, want %d: %s", url, resp.StatusCode, status, tail(b.String(), 500))
	}
	return []byte(b.String())
}

// scrape adds the metric names of a Prometheus text exposition to have:
// sample names (with _bucket, _sum, _count) and the names in HELP/TYPE lines.
func scrape(t *testing.T, url string, have map[string]bool) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatalf("scrape %s: %v", url, err)
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	n := 0
	for sc.Scan() {
		line := sc.Text()
		if f := strings.Fields(line); len(f) >= 3 && (f[1] == "HELP" || f[1] == "TYPE") {
			have[f[2]] = true
			continue
		}
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		name := line
		if i := strings.IndexAny(line, "{ "); i > 0 {
			name = line[:i]
		}
		have[name] = true
		n++
	}
	if n == 0 {
		t.Fatalf("%s exported no samples", url)
	}
}
