// Package cache_e2e runs `shoal cache` end to end: real cache processes in
// front of the Docker-Hub-like test hub, with a real Redis where replicas
// share state, real OCI clients, and real `shoal node` processes beside real
// containerd for the node → cache path.
package cache_e2e

import (
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/shoal-oci/shoal/test/harness"
	"github.com/shoal-oci/shoal/test/hub"
)

// shoalBin is the binary TestMain built; buildErr says why it is missing.
var (
	shoalBin string
	buildErr error
)

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "shoal-cache-e2e-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "cache e2e:", err)
		os.Exit(1)
	}
	shoalBin, buildErr = harness.BuildShoal(dir)
	code := m.Run()
	_ = os.RemoveAll(dir)
	os.Exit(code)
}

func requireShoal(t *testing.T) string {
	t.Helper()
	if buildErr != nil {
		t.Fatalf("build shoal: %v", buildErr)
	}
	return shoalBin
}

// cacheOpts configures one `shoal cache` process.
type cacheOpts struct {
	name string
	// upstreams are --upstream values; empty maps the hub's own host to it.
	upstreams []string
	// dataDir is --data-dir; empty gives a fresh temporary directory.
	dataDir string
	args    []string
	env     []string // added to the process's environment
}

// cacheProc is a running `shoal cache` owned by one test: the harness's
// process, with the short names these tests use.
type cacheProc struct {
	*harness.ShoalCache
	name        string
	addr        string // 127.0.0.1:P
	metricsAddr string
	dataDir     string
	logPath     string
}

// startCache starts `shoal cache` on random loopback ports in front of h,
// waits for /readyz, and stops it in t.Cleanup.
func startCache(t *testing.T, h *hub.Hub, o cacheOpts) *cacheProc {
	t.Helper()
	if len(o.upstreams) == 0 && h != nil {
		o.upstreams = []string{h.Host() + "=" + h.URL()}
	}
	c := harness.StartShoalCache(t, harness.CacheOptions{Bin: requireShoal(t), Name: o.name, Upstreams: o.upstreams, DataDir: o.dataDir, Args: o.args, Env: o.env})
	return &cacheProc{ShoalCache: c, name: c.Name, addr: c.Addr, metricsAddr: c.MetricsAddr, dataDir: c.DataDir, logPath: c.LogPath}
}

func (c *cacheProc) url() string { return c.URL() }
func (c *cacheProc) stop()       { c.Stop() }
func (c *cacheProc) kill()       { c.Kill() }
func (c *cacheProc) log() string { return c.Log() }

// metrics returns the raw /metrics text.
func (c *cacheProc) metrics(t *testing.T) string { return c.Metrics(t) }

// metric sums the samples of name whose labels include every one of labels
// (`reason="rate_limited"`).
func (c *cacheProc) metric(t *testing.T, name string, labels ...string) float64 {
	t.Helper()
	return c.Metric(t, name, labels...)
}

func sumMetric(t *testing.T, text, name string, labels ...string) float64 {
	t.Helper()
	v, err := harness.SumMetric(text, name, labels...)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// do sends a request and returns the response with its whole body read.
func do(t *testing.T, method, url string, hdr ...string) (*http.Response, []byte) {
	t.Helper()
	return harness.Request(t, method, url, hdr...)
}

func doErr(method, url string, hdr ...string) (*http.Response, []byte, error) {
	return harness.RequestErr(method, url, hdr...)
}

// nsURL is base + path with ?ns=ns added.
func nsURL(base, path, ns string) string {
	sep := "?"
	if strings.Contains(path, "?") {
		sep = "&"
	}
	return base + path + sep + "ns=" + ns
}

// ociError is the first error of an OCI error envelope, or zero.
type ociError struct {
	Code    string `json:"code"`
	Message string `json:"message"`
}

func parseOCIError(b []byte) (ociError, bool) {
	var env struct {
		Errors []ociError `json:"errors"`
	}
	if json.Unmarshal(b, &env) != nil || len(env.Errors) == 0 {
		return ociError{}, false
	}
	return env.Errors[0], true
}

// eventually retries f every 100ms until it returns nil or timeout passes.
func eventually(t *testing.T, timeout time.Duration, what string, f func() error) {
	t.Helper()
	harness.Eventually(t, timeout, what, f)
}
