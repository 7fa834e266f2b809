package chart

import (
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/shoal-oci/shoal/test/harness"
)

// promNamespace is the namespace label the test's Prometheus puts on every
// target, as a ServiceMonitor's relabelling does in a cluster.
const promNamespace = "shoal-test"

// prometheus is a private Prometheus server (Debian's prometheus package)
// scraping the given targets every second.
type prometheus struct{ addr string }

func startPrometheus(t *testing.T, targets ...string) *prometheus {
	t.Helper()
	bin := harness.Binary(t, "SHOAL_PROMETHEUS_BIN", "prometheus")
	dir := t.TempDir()
	quoted := make([]string, len(targets))
	for i, tg := range targets {
		quoted[i] = fmt.Sprintf("%q", tg)
	}
	cfg := fmt.Sprintf(`global:
  scrape_interval: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: shoal
    static_configs:
      - targets: [%s]
        labels:
          namespace: %s
`, strings.Join(quoted, ", "), promNamespace)
	cfgPath := filepath.Join(dir, "prometheus.yml")
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	p := &prometheus{addr: fmt.Sprintf("127.0.0.1:%d", harness.FreePort(t))}
	logPath := filepath.Join(dir, "prometheus.log")
	logf, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "--config.file="+cfgPath, "--storage.tsdb.path="+filepath.Join(dir, "data"),
		"--web.listen-address="+p.addr, "--log.level=warn")
	cmd.Stdout, cmd.Stderr = logf, logf
	t.Cleanup(func() { logf.Close() })
	done, err := harness.Spawn(t, cmd, syscall.SIGTERM, 10*time.Second)
	if err != nil {
		t.Fatalf("start prometheus: %v", err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		resp, err := http.Get("http://" + p.addr + "/-/ready")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return p
			}
		}
		select {
		case <-done:
			b, _ := os.ReadFile(logPath)
			t.Fatalf("prometheus exited early:\n%s", b)
		default:
		}
		if time.Now().After(deadline) {
			b, _ := os.ReadFile(logPath)
			t.Fatalf("prometheus not ready after 30s:\n%s", b)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// query runs an instant PromQL query and returns the number of series in
// its result, or the error Prometheus gave (a parse error, for one).
func (p *prometheus) query(expr string) (int, error) {
	resp, err := http.Get("http://" + p.addr + "/api/v1/query?query=" + url.QueryEscape(expr))
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	var r struct {
		Status    string `json:"status"`
		Error     string `json:"error"`
		ErrorType string `json:"errorType"`
		Data      struct {
			ResultType string            `json:"resultType"`
			Result     []json.RawMessage `json:"result"`
		} `json:"data"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&r); err != nil {
		return 0, fmt.Errorf("decode: %w", err)
	}
	if r.Status != "success" {
		return 0, fmt.Errorf("%s: %s", r.ErrorType, r.Error)
	}
	if r.Data.ResultType == "scalar" {
		return 1, nil
	}
	return len(r.Data.Result), nil
}

// grafanaExpr replaces the Grafana variables the dashboards use with what
// Grafana would send for the test's namespace and a 5-minute view.
func grafanaExpr(q string) string {
	return strings.NewReplacer(
		"$namespace", promNamespace,
		"$__rate_interval", "30s",
		"$__range", "5m",
	).Replace(q)
}

// checkDashboardsOnPrometheus has a real Prometheus scrape the node and the
// cache, then runs every query of every dashboard: each must parse and
// return at least one series. A selector on a label (result, status,
// method, source, kind, ...) with a value that no series has would return
// none. A query that ends in a comparison (an alert-like panel, "== 1")
// shows a series only when the condition holds; its left side must return
// one.
func checkDashboardsOnPrometheus(t *testing.T, targets ...string) {
	t.Helper()
	p := startPrometheus(t, targets...)
	// Every target up and scraped several times, so that rate() has samples.
	deadline := time.Now().Add(60 * time.Second)
	for {
		n, err := p.query(fmt.Sprintf(`count(count_over_time(up{job="shoal"}[1m]) >= 5) == %d and count(up{job="shoal"} == 1) == %d`, len(targets), len(targets)))
		if err == nil && n == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("prometheus has not scraped all %d targets 5 times: %d series, %v", len(targets), n, err)
		}
		time.Sleep(250 * time.Millisecond)
	}
	files, _ := filepath.Glob(filepath.Join(chartDir, "dashboards", "*.json"))
	checked := 0
	for _, f := range files {
		_, qs := dashboardQueries(t, f)
		for _, q := range qs {
			if q == "" {
				continue // a datasource variable: no query
			}
			if strings.HasPrefix(q, "label_values(") {
				// A Grafana templating function, not PromQL: its metric must
				// carry the label.
				inner := strings.TrimSuffix(strings.TrimPrefix(q, "label_values("), ")")
				metric, label, _ := strings.Cut(inner, ",")
				q = fmt.Sprintf("count by (%s) (%s)", strings.TrimSpace(label), strings.TrimSpace(metric))
			}
			expr := grafanaExpr(q)
			if i := strings.LastIndex(expr, " == "); i > 0 && !strings.Contains(expr[i:], ")") {
				expr = expr[:i] // the comparison's left side
			}
			n, err := p.query(expr)
			switch {
			case err != nil:
				t.Errorf("%s: %s: %v", filepath.Base(f), q, err)
			case n == 0:
				t.Errorf("%s: %s returns no series", filepath.Base(f), expr)
			}
			checked++
		}
	}
	if checked < 40 {
		t.Errorf("checked only %d queries", checked)
	}
}
