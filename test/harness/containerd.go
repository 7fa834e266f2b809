package harness

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// ContainerdVersion selects which containerd StartContainerd runs.
type ContainerdVersion int

// The containerd versions the tests run against.
const (
	// ContainerdV2 is containerd v2.4.2 (SHOAL_CONTAINERD_BIN).
	ContainerdV2 ContainerdVersion = iota
	// ContainerdV17 is containerd v1.7.29 (SHOAL_CONTAINERD17_BIN).
	ContainerdV17
)

// String names the version.
func (v ContainerdVersion) String() string {
	if v == ContainerdV17 {
		return "v1.7"
	}
	return "v2"
}

// ContainerdNamespace is the namespace the tests use, as kubelet does.
const ContainerdNamespace = "k8s.io"

// Containerd is a private containerd daemon owned by one test. CRI is
// disabled, so deleted images stay deleted.
type Containerd struct {
	Version    ContainerdVersion
	Socket     string // absolute path of the gRPC socket
	Root       string
	State      string
	CertsDir   string // registry hosts dir (config_path)
	ConfigPath string // the config.toml it runs with
	Bin        string // the containerd binary
	CtrBin     string // the ctr binary (v2; it also talks to 1.7)
	// CtrTimeout bounds each ctr command; 0: 60 s, or 10 min in a netns.
	CtrTimeout time.Duration

	dir     string
	logPath string
	// downloads and chunk configure chunked layer fetch (v2); 0: off.
	downloads, chunk int
	// netns runs containerd in this network namespace ("": the test's).
	netns string

	mu   sync.Mutex
	cmd  *exec.Cmd
	done chan struct{}
}

// StartContainerd starts containerd of version v in private directories and
// stops it and removes them when the test ends. It needs root.
func StartContainerd(t testing.TB, v ContainerdVersion) *Containerd {
	t.Helper()
	return startContainerd(t, &Containerd{Version: v})
}

// StartContainerdChunked starts a containerd 2 whose pulls split each layer
// into parallel open-ended Range requests of chunk bytes, downloads at a
// time (max_concurrent_downloads, concurrent_layer_fetch_buffer).
func StartContainerdChunked(t testing.TB, downloads, chunk int) *Containerd {
	t.Helper()
	return startContainerd(t, &Containerd{Version: ContainerdV2, downloads: downloads, chunk: chunk})
}

// StartContainerdNetNS starts a containerd 2 inside network namespace ns,
// so its pulls reach a node in the same namespace over the namespace's own
// loopback, beside the node's shaped uplink.
func StartContainerdNetNS(t testing.TB, ns string) *Containerd {
	t.Helper()
	return startContainerd(t, &Containerd{Version: ContainerdV2, netns: ns})
}

func startContainerd(t testing.TB, c *Containerd) *Containerd {
	t.Helper()
	RequireRoot(t)
	v := c.Version
	if v == ContainerdV17 {
		c.Bin = cachedBinary(t, "SHOAL_CONTAINERD17_BIN", "containerd-v1.7.29", "containerd", "containerd-1.7")
	} else {
		c.Bin = cachedBinary(t, "SHOAL_CONTAINERD_BIN", "containerd-v2.4.2", "containerd", "containerd")
	}
	c.CtrBin = cachedBinary(t, "SHOAL_CTR_BIN", "containerd-v2.4.2", "ctr", "ctr")

	// A unix socket path must stay under ~108 bytes: t.TempDir can be longer.
	dir, err := os.MkdirTemp("/tmp", "shoal-ctrd-")
	if err != nil {
		t.Fatalf("containerd dir: %v", err)
	}
	c.dir = dir
	c.Root = filepath.Join(dir, "root")
	c.State = filepath.Join(dir, "state")
	c.CertsDir = filepath.Join(dir, "certs.d")
	c.Socket = filepath.Join(dir, "containerd.sock")
	c.ConfigPath = filepath.Join(dir, "config.toml")
	c.logPath = filepath.Join(dir, "containerd.log")
	if err := os.MkdirAll(c.CertsDir, 0o755); err != nil {
		t.Fatalf("certs dir: %v", err)
	}
	if err := os.WriteFile(c.ConfigPath, []byte(c.config()), 0o644); err != nil {
		t.Fatalf("write containerd config: %v", err)
	}
	t.Cleanup(func() {
		c.Stop()
		if t.Failed() {
			c.logTail(t)
		}
		_ = os.RemoveAll(dir)
	})
	c.start(t)
	return c
}

func (c *Containerd) config() string {
	if c.Version == ContainerdV17 {
		return fmt.Sprintf(`version = 2
root = %q
state = %q
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = %q
`, c.Root, c.State, c.Socket)
	}
	return fmt.Sprintf(`version = 3
root = %q
state = %q
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.cri.v1.images", "io.containerd.cri.v1.runtime", "io.containerd.podsandbox.controller.v1.podsandbox", "io.containerd.nri.v1.nri"]
[grpc]
  address = %q
[plugins."io.containerd.transfer.v1.local"]
  config_path = %q
%s`, c.Root, c.State, c.Socket, c.CertsDir, c.chunkConfig())
}

func (c *Containerd) chunkConfig() string {
	if c.chunk <= 0 {
		return ""
	}
	return fmt.Sprintf("  max_concurrent_downloads = %d\n  concurrent_layer_fetch_buffer = %d\n", c.downloads, c.chunk)
}

func (c *Containerd) start(t testing.TB) {
	t.Helper()
	logf, err := os.OpenFile(c.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		t.Fatalf("containerd log: %v", err)
	}
	cmd := exec.Command(c.Bin, "--config", c.ConfigPath)
	if c.netns != "" {
		cmd = exec.Command("ip", "netns", "exec", c.netns, c.Bin, "--config", c.ConfigPath)
	}
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		logf.Close()
		t.Fatalf("start containerd: %v", err)
	}
	done := make(chan struct{})
	go func() {
		_ = cmd.Wait()
		logf.Close()
		close(done)
	}()
	c.mu.Lock()
	c.cmd, c.done = cmd, done
	c.mu.Unlock()

	deadline := time.Now().Add(15 * time.Second)
	for {
		conn, err := net.DialTimeout("unix", c.Socket, time.Second)
		if err == nil {
			conn.Close()
			return
		}
		select {
		case <-done:
			c.logTail(t)
			t.Fatalf("containerd exited before it was ready")
		default:
		}
		if time.Now().After(deadline) {
			c.logTail(t)
			t.Fatalf("containerd not ready after 15s: %v", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Stop stops containerd (SIGTERM, then SIGKILL after 5s) and waits for it.
// It is safe to call more than once.
func (c *Containerd) Stop() {
	c.mu.Lock()
	cmd, done := c.cmd, c.done
	c.cmd = nil
	c.mu.Unlock()
	if cmd == nil {
		return
	}
	_ = cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		<-done
	}
	_ = os.Remove(c.Socket)
}

// Restart stops containerd and starts it again with the same directories.
func (c *Containerd) Restart(t testing.TB) {
	t.Helper()
	c.Stop()
	c.start(t)
}

// Ctr runs ctr against this containerd in the k8s.io namespace and returns
// its standard output. A failure fails the test, showing standard error.
func (c *Containerd) Ctr(t testing.TB, args ...string) string {
	t.Helper()
	out, err := c.CtrErr(args...)
	if err != nil {
		t.Fatalf("ctr %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return out
}

// CtrErr runs ctr like Ctr and returns its standard output, or an error that
// carries its standard error.
func (c *Containerd) CtrErr(args ...string) (string, error) {
	limit := 60 * time.Second
	switch {
	case c.CtrTimeout > 0:
		limit = c.CtrTimeout
	case c.netns != "":
		limit = 10 * time.Minute // benchmarks on shaped links pull large images
	}
	ctx, cancel := context.WithTimeout(context.Background(), limit)
	defer cancel()
	full := append([]string{"-a", c.Socket, "-n", ContainerdNamespace}, args...)
	var stdout, stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, c.CtrBin, full...)
	if c.netns != "" {
		// ctr fetches in its own process: it must sit beside containerd,
		// not send the node's uplink its downloads.
		cmd = exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", c.netns, c.CtrBin}, full...)...)
	}
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.String(), fmt.Errorf("%w: %s", err, strings.TrimSpace(stderr.String()))
	}
	return stdout.String(), nil
}

// Import imports an image archive (see WriteOCILayoutTar) without unpacking
// it, keeping every platform's content that the archive holds.
func (c *Containerd) Import(t testing.TB, tarPath string) {
	t.Helper()
	c.Ctr(t, "images", "import", "--no-unpack", "--all-platforms", tarPath)
}

func (c *Containerd) logTail(t testing.TB) {
	t.Helper()
	b, err := os.ReadFile(c.logPath)
	if err != nil {
		return
	}
	if len(b) > 4096 {
		b = b[len(b)-4096:]
	}
	t.Logf("containerd log (tail):\n%s", b)
}

// cachedBinary is Binary that also looks where test/install.sh caches
// builds (~/.cache/shoal-test/bin/<sub>/<file>) before it looks on PATH for
// pathName.
func cachedBinary(t testing.TB, env, sub, file, pathName string) string {
	t.Helper()
	if os.Getenv(env) == "" {
		if home, err := os.UserHomeDir(); err == nil {
			p := filepath.Join(home, ".cache", "shoal-test", "bin", sub, file)
			if st, err := os.Stat(p); err == nil && st.Mode().IsRegular() {
				return p
			}
		}
	}
	return Binary(t, env, pathName)
}
