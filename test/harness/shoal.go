package harness

import (
	"bufio"
	"context"
	"fmt"
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
)

// ShoalPackage is the import path of the shoal command.
const ShoalPackage = "github.com/shoal-oci/shoal"

// BuildShoal builds the shoal binary into dir and returns its path. It is
// meant for TestMain, so that a test package builds the binary once. Extra
// go build flags (for example "-race") come from buildFlags.
func BuildShoal(dir string, buildFlags ...string) (string, error) {
	out := filepath.Join(dir, "shoal")
	args := append([]string{"build"}, buildFlags...)
	args = append(args, "-o", out, ShoalPackage)
	cmd := exec.Command("go", args...)
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("go build %s: %w", ShoalPackage, err)
	}
	return out, nil
}

// NodeOptions configures one `shoal node` process.
type NodeOptions struct {
	// Bin is the shoal binary (see BuildShoal). Required.
	Bin string
	// Name labels the node in logs and failure output ("A", "B", ...).
	Name string
	// Containerd is the containerd the node serves. Nil: LayoutDir must be set.
	Containerd *Containerd
	// LayoutDir serves an OCI image layout instead of containerd.
	LayoutDir string
	// BootstrapPeers are other nodes' router addresses (host:port or multiaddrs).
	BootstrapPeers []string
	// ProviderTTL is the DHT provider record TTL. Zero: 3s.
	ProviderTTL time.Duration
	// Registries is --mirrored-registries. Empty: docker.io.
	Registries []string
	// NoRouter runs the node without peers (--router-addr "").
	NoRouter bool
	// Args are extra command-line flags.
	Args []string
}

// ShoalNode is a running `shoal node` process owned by one test.
type ShoalNode struct {
	Name         string
	RegistryAddr string // 127.0.0.1:P
	RouterAddr   string // 127.0.0.1:Q, empty with NoRouter
	MetricsAddr  string // 127.0.0.1:M
	DataDir      string
	LogPath      string

	cmd  *exec.Cmd
	done chan struct{}
	mu   sync.Mutex
	err  error // exit status, once done is closed
}

// StartShoalNode starts `shoal node` on random loopback ports, waits until
// /readyz answers 200, and stops it with SIGTERM in t.Cleanup. Its log is
// printed when the test fails.
func StartShoalNode(t testing.TB, o NodeOptions) *ShoalNode {
	t.Helper()
	if o.Bin == "" {
		t.Fatal("StartShoalNode: Bin is required")
	}
	if o.Name == "" {
		o.Name = "node"
	}
	if o.ProviderTTL == 0 {
		o.ProviderTTL = 3 * time.Second
	}
	if len(o.Registries) == 0 {
		o.Registries = []string{"docker.io"}
	}
	dir := t.TempDir()
	n := &ShoalNode{
		Name:         o.Name,
		RegistryAddr: fmt.Sprintf("127.0.0.1:%d", FreePort(t)),
		MetricsAddr:  fmt.Sprintf("127.0.0.1:%d", FreePort(t)),
		DataDir:      filepath.Join(dir, "data"),
		LogPath:      filepath.Join(dir, "shoal-"+o.Name+".log"),
		done:         make(chan struct{}),
	}
	if !o.NoRouter {
		n.RouterAddr = fmt.Sprintf("127.0.0.1:%d", FreePort(t))
	}
	args := []string{"node",
		"--registry-addr", n.RegistryAddr,
		"--router-addr", n.RouterAddr,
		"--metrics-addr", n.MetricsAddr,
		"--data-dir", n.DataDir,
		"--provider-ttl", o.ProviderTTL.String(),
		"--mirrored-registries", strings.Join(o.Registries, ","),
		"--log-level", "debug",
		"--shutdown-grace", "5s",
	}
	switch {
	case o.LayoutDir != "":
		args = append(args, "--layout-dir", o.LayoutDir)
	case o.Containerd != nil:
		args = append(args, "--containerd-sock", o.Containerd.Socket, "--containerd-config", o.Containerd.ConfigPath)
	default:
		t.Fatal("StartShoalNode: Containerd or LayoutDir is required")
	}
	if len(o.BootstrapPeers) > 0 {
		args = append(args, "--bootstrap-peers", strings.Join(o.BootstrapPeers, ","))
	}
	args = append(args, o.Args...)

	logf, err := os.Create(n.LogPath)
	if err != nil {
		t.Fatalf("shoal log: %v", err)
	}
	cmd := exec.Command(o.Bin, args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	// Keep the test's own SHOAL_* variables from leaking into the node.
	cmd.Env = filteredEnv("SHOAL_")
	if err := cmd.Start(); err != nil {
		logf.Close()
		t.Fatalf("start shoal node %s: %v", o.Name, err)
	}
	n.cmd = cmd
	go func() {
		err := cmd.Wait()
		logf.Close()
		n.mu.Lock()
		n.err = err
		n.mu.Unlock()
		close(n.done)
	}()
	t.Cleanup(func() {
		n.Stop()
		if t.Failed() {
			n.dumpLog(t)
		}
	})

	deadline := time.Now().Add(20 * time.Second)
	client := &http.Client{Timeout: time.Second}
	for {
		resp, err := client.Get("http://" + n.MetricsAddr + "/readyz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return n
			}
		}
		select {
		case <-n.done:
			n.dumpLog(t)
			t.Fatalf("shoal node %s exited before it was ready: %v", o.Name, n.ExitErr())
		default:
		}
		if time.Now().After(deadline) {
			n.dumpLog(t)
			t.Fatalf("shoal node %s not ready after 20s", o.Name)
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

// URL is the node's registry base URL, http://127.0.0.1:P.
func (n *ShoalNode) URL() string { return "http://" + n.RegistryAddr }

// PID is the process id.
func (n *ShoalNode) PID() int { return n.cmd.Process.Pid }

// Alive reports whether the process is still running.
func (n *ShoalNode) Alive() bool {
	select {
	case <-n.done:
		return false
	default:
		return true
	}
}

// ExitErr is the process's exit status once it has exited.
func (n *ShoalNode) ExitErr() error {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.err
}

// Stop sends SIGTERM and waits up to 10s, then SIGKILLs. Safe to call more
// than once.
func (n *ShoalNode) Stop() {
	if !n.Alive() {
		return
	}
	_ = n.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-n.done:
	case <-time.After(10 * time.Second):
		_ = n.cmd.Process.Kill()
		<-n.done
	}
}

// Kill sends SIGKILL and waits for the process to go.
func (n *ShoalNode) Kill() {
	if !n.Alive() {
		return
	}
	_ = n.cmd.Process.Kill()
	<-n.done
}

// Log returns the node's log so far.
func (n *ShoalNode) Log() string {
	b, _ := os.ReadFile(n.LogPath)
	return string(b)
}

func (n *ShoalNode) dumpLog(t testing.TB) {
	t.Helper()
	b, err := os.ReadFile(n.LogPath)
	if err != nil {
		return
	}
	if len(b) > 64<<10 {
		b = append([]byte("...\n"), b[len(b)-64<<10:]...)
	}
	t.Logf("shoal node %s log (%s):\n%s", n.Name, n.LogPath, b)
}

// Metric returns the sum of the node's samples of the metric name whose
// labels include every one of labels ("source=\"peer\""). A missing metric
// is 0.
func (n *ShoalNode) Metric(t testing.TB, name string, labels ...string) float64 {
	t.Helper()
	v, err := n.MetricErr(name, labels...)
	if err != nil {
		t.Fatalf("node %s metrics: %v", n.Name, err)
	}
	return v
}

// MetricErr is Metric returning an error instead of failing the test.
func (n *ShoalNode) MetricErr(name string, labels ...string) (float64, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+n.MetricsAddr+"/metrics", nil)
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

func sumMetric(sc *bufio.Scanner, name string, labels []string) (float64, error) {
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	var sum float64
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
			continue // a longer metric name
		}
		ok := true
		for _, l := range labels {
			if !strings.Contains(","+lbls+",", ","+l+",") {
				ok = false
				break
			}
		}
		if !ok {
			continue
		}
		fields := strings.Fields(rest)
		if len(fields) == 0 {
			continue
		}
		v, err := strconv.ParseFloat(fields[0], 64)
		if err != nil {
			return 0, fmt.Errorf("metric line %q: %w", line, err)
		}
		sum += v
	}
	if err := sc.Err(); err != nil {
		return 0, err
	}
	return sum, nil
}
