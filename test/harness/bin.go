// Package harness starts the real components that shoal's tests run against:
// containerd, Redis, a Docker-Hub-like upstream, shoal processes. Each server
// runs on a random loopback port, belongs to one test, and stops in t.Cleanup.
package harness

import (
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
)

// InCI reports whether the tests run in CI (CI=true), where a missing
// dependency is a failure rather than a skip.
func InCI() bool { return os.Getenv("CI") == "true" }

// Missing fails the test in CI and skips it elsewhere, with a message that
// says how to install what is missing.
func Missing(t testing.TB, format string, args ...any) {
	t.Helper()
	msg := fmt.Sprintf(format, args...) + " (run test/run, which installs the test dependencies)"
	if InCI() {
		t.Fatal(msg)
	}
	t.Skip(msg)
}

// Binary returns the path of a test dependency: the file named by the
// environment variable env (set by test/install.sh), else name on PATH.
func Binary(t testing.TB, env, name string) string {
	t.Helper()
	if p := os.Getenv(env); p != "" {
		if _, err := os.Stat(p); err == nil {
			return p
		}
	}
	if p, err := exec.LookPath(name); err == nil {
		return p
	}
	Missing(t, "%s not found: set %s or put it on PATH", name, env)
	return ""
}

// RequireRoot fails in CI and skips elsewhere when not running as root.
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		Missing(t, "this test needs root")
	}
}

// FreePort returns a TCP port on 127.0.0.1 that no other process binds
// before the caller's process does. The kernel's own choices (port 0
// listeners, the source ports of outgoing connections) come from
// ip_local_port_range (32768-60999 by default); FreePort hands out ports
// below it, so none of those can take a port between FreePort's return and
// the caller's bind. Other test processes (go test runs packages in
// parallel) use the same range; a reservation file per port, created
// exclusively and naming the reserving process, keeps them apart. A
// reservation is taken over once its process has exited.
func FreePort(t testing.TB) int {
	t.Helper()
	port, err := reservePort()
	if err != nil {
		t.Fatalf("free port: %v", err)
	}
	return port
}

// portReservations is where reservation files live; .lock in it
// serializes reservations.
var portReservations = filepath.Join(os.TempDir(), "shoal-test-ports")

var portMu sync.Mutex

func reservePort() (int, error) {
	portMu.Lock()
	defer portMu.Unlock()
	lo, hi := reservableRange()
	if err := os.MkdirAll(portReservations, 0o755); err != nil {
		return 0, err
	}
	// One reservation at a time across processes, so that two of them
	// never both take over the same stale file.
	lock, err := os.OpenFile(filepath.Join(portReservations, ".lock"), os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return 0, err
	}
	defer lock.Close()
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX); err != nil {
		return 0, fmt.Errorf("lock %s: %w", lock.Name(), err)
	}
	defer syscall.Flock(int(lock.Fd()), syscall.LOCK_UN)
	start := lo + rand.IntN(hi-lo)
	for i := range hi - lo {
		port := lo + (start-lo+i)%(hi-lo)
		if !reserve(port) {
			continue
		}
		l, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", port))
		if err != nil {
			continue // bound by something that does not reserve; stays reserved, unused
		}
		l.Close()
		return port, nil
	}
	return 0, fmt.Errorf("no free port in %d-%d", lo, hi)
}

// reserve takes port's reservation file for this process, or a stale one
// whose process has gone.
func reserve(port int) bool {
	path := filepath.Join(portReservations, strconv.Itoa(port))
	for range 2 {
		f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
		if err == nil {
			_, err = fmt.Fprintf(f, "%d\n", os.Getpid())
			f.Close()
			return err == nil
		}
		b, rerr := os.ReadFile(path)
		if rerr != nil {
			return false
		}
		pid, perr := strconv.Atoi(strings.TrimSpace(string(b)))
		if perr == nil && (pid == os.Getpid() || syscall.Kill(pid, 0) == nil) {
			return false // ours already, or a live process's
		}
		_ = os.Remove(path) // stale; try once more to create it
	}
	return false
}

// reservableRange is [20000, the start of ip_local_port_range).
func reservableRange() (lo, hi int) {
	lo, hi = 20000, 32768
	if b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range"); err == nil {
		if f := strings.Fields(string(b)); len(f) == 2 {
			if v, err := strconv.Atoi(f[0]); err == nil && v > lo+1000 {
				hi = v
			}
		}
	}
	return lo, hi
}
