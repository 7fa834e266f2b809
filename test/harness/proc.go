package harness

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// Proc is a shoal process (node or cache) owned by one test: it binds port
// 0 on loopback (or the address it was given) and reports the ports the
// kernel picked in its --addr-file, logs to a file printed when the test
// fails, and stops with SIGTERM in t.Cleanup.
type Proc struct {
	Kind        string // "node" or "cache"
	Name        string
	MetricsAddr string // 127.0.0.1:M, once started
	LogPath     string
	// Addrs is what the process wrote to its --addr-file, once started.
	Addrs    Addrs
	addrFile string

	cmd  *exec.Cmd
	done chan struct{}
	mu   sync.Mutex
	err  error    // exit status, once done is closed
	env  []string // added to the process's environment
}

func newProc(kind, name, dir string) *Proc {
	return &Proc{
		Kind:     kind,
		Name:     name,
		LogPath:  filepath.Join(dir, "shoal-"+name+".log"),
		addrFile: filepath.Join(dir, "addrs.json"),
		done:     make(chan struct{}),
	}
}

// Addrs is a shoal process's --addr-file: the ports it bound.
type Addrs struct {
	Registry string   `json:"registry"`
	Metrics  string   `json:"metrics"`
	Peer     string   `json:"peer"`   // a node with a DHT
	Router   []string `json:"router"` // a node's DHT multiaddrs
}

// start runs bin with args and --addr-file, registers the cleanup, reads
// the addresses the process bound, and waits for /readyz.
func (p *Proc) start(t testing.TB, bin string, args []string) {
	t.Helper()
	args = append(args, "--addr-file", p.addrFile)
	logf, err := os.Create(p.LogPath)
	if err != nil {
		t.Fatalf("shoal log: %v", err)
	}
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	// Keep the test's own SHOAL_* variables from leaking into the process.
	cmd.Env = append(FilteredEnv("SHOAL_"), p.env...)
	if err := cmd.Start(); err != nil {
		logf.Close()
		t.Fatalf("start shoal %s %s: %v", p.Kind, p.Name, err)
	}
	p.cmd = cmd
	go func() {
		err := cmd.Wait()
		logf.Close()
		p.mu.Lock()
		p.err = err
		p.mu.Unlock()
		close(p.done)
	}()
	t.Cleanup(func() {
		p.Stop()
		if strings.Contains(p.Log(), "WARNING: DATA RACE") {
			t.Errorf("shoal %s %s reported a data race", p.Kind, p.Name)
		}
		if t.Failed() {
			p.dumpLog(t)
		}
	})

	deadline := time.Now().Add(20 * time.Second)
	p.await(t, deadline, "bound its ports (--addr-file)", func() bool {
		b, err := os.ReadFile(p.addrFile)
		if err != nil {
			return false
		}
		if err := json.Unmarshal(b, &p.Addrs); err != nil {
			t.Fatalf("shoal %s %s: --addr-file: %v", p.Kind, p.Name, err)
		}
		return true
	})
	p.MetricsAddr = p.Addrs.Metrics
	client := &http.Client{Timeout: time.Second}
	p.await(t, deadline, "ready (/readyz)", func() bool {
		resp, err := client.Get("http://" + p.MetricsAddr + "/readyz")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	})
}

// await polls ok until it holds. If the process exits first, or deadline
// passes, the test fails with the process's log.
func (p *Proc) await(t testing.TB, deadline time.Time, what string, ok func() bool) {
	t.Helper()
	for !ok() {
		select {
		case <-p.done:
			p.dumpLog(t)
			t.Fatalf("shoal %s %s exited before it was %s: %v", p.Kind, p.Name, what, p.ExitErr())
		default:
		}
		if time.Now().After(deadline) {
			p.dumpLog(t)
			t.Fatalf("shoal %s %s not %s in 20s", p.Kind, p.Name, what)
		}
		time.Sleep(25 * time.Millisecond)
	}
}

// PID is the process id.
func (p *Proc) PID() int { return p.cmd.Process.Pid }

// Alive reports whether the process is still running.
func (p *Proc) Alive() bool {
	select {
	case <-p.done:
		return false
	default:
		return true
	}
}

// ExitErr is the process's exit status once it has exited.
func (p *Proc) ExitErr() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.err
}

// Stop sends SIGTERM and waits up to 10s, then SIGKILLs. Safe to call more
// than once.
func (p *Proc) Stop() {
	if !p.Alive() {
		return
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(10 * time.Second):
		_ = p.cmd.Process.Kill()
		<-p.done
	}
}

// Kill sends SIGKILL, as a crash would, and waits for the process to go.
func (p *Proc) Kill() {
	if !p.Alive() {
		return
	}
	_ = p.cmd.Process.Kill()
	<-p.done
}

// Log returns the process's log so far.
func (p *Proc) Log() string {
	b, _ := os.ReadFile(p.LogPath)
	return string(b)
}

func (p *Proc) dumpLog(t testing.TB) {
	t.Helper()
	b, err := os.ReadFile(p.LogPath)
	if err != nil {
		return
	}
	if len(b) > 64<<10 {
		b = append([]byte("...\n"), b[len(b)-64<<10:]...)
	}
	t.Logf("shoal %s %s log (%s):\n%s", p.Kind, p.Name, p.LogPath, b)
}

// Metrics returns the raw /metrics text.
func (p *Proc) Metrics(t testing.TB) string {
	t.Helper()
	resp, body := Request(t, http.MethodGet, "http://"+p.MetricsAddr+"/metrics")
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("%s %s /metrics: %s", p.Kind, p.Name, resp.Status)
	}
	return string(body)
}

// Metric returns the sum of the samples of the metric name whose labels
// include every one of labels (`source="peer"`). A missing metric is 0.
func (p *Proc) Metric(t testing.TB, name string, labels ...string) float64 {
	t.Helper()
	v, err := p.MetricErr(name, labels...)
	if err != nil {
		t.Fatalf("%s %s metrics: %v", p.Kind, p.Name, err)
	}
	return v
}

// MetricErr is Metric returning an error instead of failing the test.
func (p *Proc) MetricErr(name string, labels ...string) (float64, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+p.MetricsAddr+"/metrics", nil)
	if err != nil {
		return 0, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return 0, fmt.Errorf("GET /metrics: %s", resp.Status)
	}
	return sumMetric(bufio.NewScanner(resp.Body), name, labels)
}

// SumMetric sums the samples of name in a /metrics text whose labels include
// every one of labels.
func SumMetric(text, name string, labels ...string) (float64, error) {
	return sumMetric(bufio.NewScanner(strings.NewReader(text)), name, labels)
}

// CacheOptions configures one `shoal cache` process.
type CacheOptions struct {
	// Bin is the shoal binary (see BuildShoal). Required.
	Bin  string
	Name string
	// Upstreams are --upstream values (host=endpoint).
	Upstreams []string
	// DataDir is --data-dir; empty gives a fresh temporary directory.
	DataDir string
	// Args are extra command-line flags.
	Args []string
	// NoAdvertise leaves out --advertise-url (by default each replica
	// advertises its own URL, as the chart's do).
	NoAdvertise bool
	// ListenIP is the address the registry port listens on; default
	// 127.0.0.1.
	ListenIP string
	// Env is added to the process's environment (storage credentials).
	Env []string
}

// ShoalCache is a running `shoal cache` process owned by one test.
type ShoalCache struct {
	*Proc
	Addr    string // 127.0.0.1:P
	DataDir string
}

// StartShoalCache starts `shoal cache` on random loopback ports, waits until
// /readyz answers 200, and stops it with SIGTERM in t.Cleanup.
func StartShoalCache(t testing.TB, o CacheOptions) *ShoalCache {
	t.Helper()
	if o.Bin == "" {
		t.Fatal("StartShoalCache: Bin is required")
	}
	if o.Name == "" {
		o.Name = "cache"
	}
	dir := t.TempDir()
	if o.DataDir == "" {
		o.DataDir = filepath.Join(dir, "data")
	}
	if o.ListenIP == "" {
		o.ListenIP = "127.0.0.1"
	}
	c := &ShoalCache{Proc: newProc("cache", o.Name, dir), DataDir: o.DataDir}
	c.env = o.Env
	args := []string{"cache",
		"--addr", net.JoinHostPort(o.ListenIP, "0"),
		"--metrics-addr", "127.0.0.1:0",
		"--data-dir", c.DataDir,
		"--log-level", "debug",
		"--shutdown-grace", "2s",
	}
	if !o.NoAdvertise {
		// Port 0: the port --addr bound.
		args = append(args, "--advertise-url", "http://"+net.JoinHostPort(o.ListenIP, "0"))
	}
	for _, u := range o.Upstreams {
		args = append(args, "--upstream", u)
	}
	c.start(t, o.Bin, append(args, o.Args...))
	c.Addr = c.Addrs.Registry
	return c
}

// URL is the cache's base URL, http://127.0.0.1:P (or ListenIP:P).
func (c *ShoalCache) URL() string { return "http://" + c.Addr }
