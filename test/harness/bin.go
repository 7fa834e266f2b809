// Package harness starts the real components that shoal's tests run against:
// containerd, Redis, a Docker-Hub-like upstream, shoal processes. Each server
// runs on a random loopback port, belongs to one test, and stops in t.Cleanup.
package harness

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"sync"
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

// handedOut remembers every port FreePort returned in this test process:
// the kernel may offer a port again as soon as it is closed, and two
// listeners of one process (a node's router and peer ports) must never get
// the same one.
var handedOut = struct {
	sync.Mutex
	ports map[int]bool
}{ports: map[int]bool{}}

// FreePort returns a free TCP port on 127.0.0.1 that it has not returned
// before in this process. The port is closed again when it returns, so
// another process could still take it before the caller binds it.
func FreePort(t testing.TB) int {
	t.Helper()
	handedOut.Lock()
	defer handedOut.Unlock()
	for range 100 {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatalf("free port: %v", err)
		}
		port := l.Addr().(*net.TCPAddr).Port
		l.Close()
		if !handedOut.ports[port] {
			handedOut.ports[port] = true
			return port
		}
	}
	t.Fatal("free port: the kernel keeps offering ports already handed out")
	return 0
}
