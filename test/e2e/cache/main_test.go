// Package cache_e2e runs `shoal cache` end to end: real cache processes in
// front of the Docker-Hub-like test hub, with a real Redis where replicas
// share state, real OCI clients, and real `shoal node` processes beside real
// containerd for the node → cache path.
package cache_e2e

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
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
}

// cacheProc is a running `shoal cache` owned by one test.
type cacheProc struct {
	name        string
	addr        string // 127.0.0.1:P
	metricsAddr string
	dataDir     string
	logPath     string

	cmd  *exec.Cmd
	done chan struct{}
	mu   sync.Mutex
	err  error
}

// startCache starts `shoal cache` on random loopback ports, waits for
// /readyz, and stops it with SIGTERM in t.Cleanup, printing its log if the
// test failed.
func startCache(t *testing.T, h *hub.Hub, o cacheOpts) *cacheProc {
	t.Helper()
	bin := requireShoal(t)
	if o.name == "" {
		o.name = "cache"
	}
	dir := t.TempDir()
	if o.dataDir == "" {
		o.dataDir = filepath.Join(dir, "data")
	}
	if len(o.upstreams) == 0 && h != nil {
		o.upstreams = []string{h.Host() + "=" + h.URL()}
	}
	c := &cacheProc{
		name:        o.name,
		addr:        fmt.Sprintf("127.0.0.1:%d", harness.FreePort(t)),
		metricsAddr: fmt.Sprintf("127.0.0.1:%d", harness.FreePort(t)),
		dataDir:     o.dataDir,
		logPath:     filepath.Join(dir, "shoal-"+o.name+".log"),
		done:        make(chan struct{}),
	}
	args := []string{"cache",
		"--addr", c.addr,
		"--metrics-addr", c.metricsAddr,
		"--data-dir", c.dataDir,
		"--log-level", "debug",
		"--shutdown-grace", "2s",
	}
	for _, u := range o.upstreams {
		args = append(args, "--upstream", u)
	}
	args = append(args, o.args...)
	logf, err := os.Create(c.logPath)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.Env = filteredEnv("SHOAL_")
	if err := cmd.Start(); err != nil {
		logf.Close()
		t.Fatalf("start shoal cache: %v", err)
	}
	c.cmd = cmd
	go func() {
		err := cmd.Wait()
		logf.Close()
		c.mu.Lock()
		c.err = err
		c.mu.Unlock()
		close(c.done)
	}()
	t.Cleanup(func() {
		c.stop()
		if t.Failed() {
			c.dumpLog(t)
		}
	})
	client := &http.Client{Timeout: time.Second}
	deadline := time.Now().Add(20 * time.Second)
	for {
		resp, err := client.Get("http://" + c.metricsAddr + "/readyz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return c
			}
		}
		select {
		case <-c.done:
			c.dumpLog(t)
			t.Fatalf("shoal cache %s exited before it was ready: %v", c.name, c.err)
		default:
		}
		if time.Now().After(deadline) {
			c.dumpLog(t)
			t.Fatalf("shoal cache %s not ready after 20s", c.name)
		}
		time.Sleep(25 * time.Millisecond)
	}
}

func filteredEnv(prefix string) []string {
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, prefix) {
			env = append(env, kv)
		}
	}
	return env
}

func (c *cacheProc) url() string { return "http://" + c.addr }

func (c *cacheProc) stop() {
	select {
	case <-c.done:
		return
	default:
	}
	_ = c.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-c.done:
	case <-time.After(10 * time.Second):
		_ = c.cmd.Process.Kill()
		<-c.done
	}
}

// kill sends SIGKILL, as a crash would, and waits for the process to go.
func (c *cacheProc) kill() {
	select {
	case <-c.done:
		return
	default:
	}
	_ = c.cmd.Process.Kill()
	<-c.done
}

func (c *cacheProc) log() string {
	b, _ := os.ReadFile(c.logPath)
	return string(b)
}

func (c *cacheProc) dumpLog(t *testing.T) {
	t.Helper()
	b := []byte(c.log())
	if len(b) > 48<<10 {
		b = append([]byte("...\n"), b[len(b)-48<<10:]...)
	}
	t.Logf("shoal cache %s log (%s):\n%s", c.name, c.logPath, b)
}

// metrics returns the raw /metrics text.
func (c *cacheProc) metrics(t *testing.T) string {
	t.Helper()
	resp, body := do(t, "GET", "http://"+c.metricsAddr+"/metrics")
	if resp.StatusCode != 200 {
		t.Fatalf("%s /metrics: %d", c.name, resp.StatusCode)
	}
	return string(body)
}

// metric sums the samples of name whose labels include every one of labels
// (`reason="rate_limited"`).
func (c *cacheProc) metric(t *testing.T, name string, labels ...string) float64 {
	t.Helper()
	return sumMetric(t, c.metrics(t), name, labels...)
}

func sumMetric(t *testing.T, text, name string, labels ...string) float64 {
	t.Helper()
	var sum float64
	sc := bufio.NewScanner(strings.NewReader(text))
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(line, "#") || !strings.HasPrefix(line, name) {
			continue
		}
		rest := line[len(name):]
		var lbls string
		switch {
		case strings.HasPrefix(rest, "{"):
			end := strings.Index(rest, "}")
			if end < 0 {
				continue
			}
			lbls, rest = rest[1:end], rest[end+1:]
		case strings.HasPrefix(rest, " "):
		default:
			continue
		}
		ok := true
		for _, l := range labels {
			if !strings.Contains(","+lbls+",", ","+l+",") {
				ok = false
			}
		}
		if f := strings.Fields(rest); ok && len(f) > 0 {
			v, err := strconv.ParseFloat(f[0], 64)
			if err != nil {
				t.Fatalf("metric line %q: %v", line, err)
			}
			sum += v
		}
	}
	return sum
}

// do sends a request and returns the response with its whole body read.
func do(t *testing.T, method, url string, hdr ...string) (*http.Response, []byte) {
	t.Helper()
	resp, body, err := doErr(method, url, hdr...)
	if err != nil {
		t.Fatalf("%s %s: %v", method, url, err)
	}
	return resp, body
}

func doErr(method, url string, hdr ...string) (*http.Response, []byte, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, method, url, nil)
	if err != nil {
		return nil, nil, err
	}
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	return resp, body, err
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
	deadline := time.Now().Add(timeout)
	for {
		err := f()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: still failing after %s: %v", what, timeout, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
