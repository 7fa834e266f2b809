package harness

import (
	"bufio"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// Redis is a private redis-server owned by one test, for fault injection:
// Kill, Pause (SIGSTOP: the port accepts but nothing answers) and Restart
// on the same port.
type Redis struct {
	URL  string // redis://127.0.0.1:PORT/0
	Addr string
	bin  string
	dir  string
	port int
	args []string // more redis-server flags (--replicaof)
	child
}

// child is a server process a test started and may stop, pause or start
// again: its command and a channel closed once it has exited.
type child struct {
	mu   sync.Mutex
	cmd  *exec.Cmd
	done chan struct{}
}

func (c *child) set(cmd *exec.Cmd, done chan struct{}) {
	c.mu.Lock()
	c.cmd, c.done = cmd, done
	c.mu.Unlock()
}

// Kill stops the process with SIGKILL (continuing it first, in case it is
// paused) and waits for it to exit.
func (c *child) Kill() {
	c.mu.Lock()
	cmd, done := c.cmd, c.done
	c.mu.Unlock()
	if cmd == nil {
		return
	}
	_ = cmd.Process.Signal(syscall.SIGCONT)
	_ = cmd.Process.Kill()
	<-done
}

func (c *child) signal(sig syscall.Signal) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.cmd != nil {
		_ = c.cmd.Process.Signal(sig)
	}
}

// StartRedis starts a private redis-server and returns its URL; see
// StartRedisServer.
func StartRedis(t testing.TB) string { return StartRedisServer(t).URL }

// RedisClient returns a go-redis client of the Redis at url, closed in
// t.Cleanup.
func RedisClient(t testing.TB, url string) *redis.Client {
	t.Helper()
	opts, err := redis.ParseURL(url)
	if err != nil {
		t.Fatal(err)
	}
	c := redis.NewClient(opts)
	t.Cleanup(func() { _ = c.Close() })
	return c
}

// StartRedisServer starts a private redis-server (SHOAL_REDIS_BIN, else
// redis-server on PATH) on a random 127.0.0.1 port, with no persistence.
// The server stops in t.Cleanup.
func StartRedisServer(t testing.TB) *Redis {
	t.Helper()
	r := &Redis{bin: Binary(t, "SHOAL_REDIS_BIN", "redis-server"), dir: t.TempDir(), port: FreePort(t)}
	r.Addr = net.JoinHostPort("127.0.0.1", strconv.Itoa(r.port))
	r.URL = fmt.Sprintf("redis://%s/0", r.Addr)
	t.Cleanup(r.Kill)
	r.start(t)
	return r
}

func (r *Redis) start(t testing.TB) {
	t.Helper()
	// Run in the foreground as our own child so Cleanup can stop exactly
	// this process.
	cmd := exec.Command(r.bin,
		"--port", strconv.Itoa(r.port), "--bind", "127.0.0.1",
		"--save", "", "--appendonly", "no", "--daemonize", "no",
		"--logfile", filepath.Join(r.dir, "redis.log"), "--dir", r.dir)
	cmd.Args = append(cmd.Args, r.args...)
	if err := cmd.Start(); err != nil {
		t.Fatalf("start redis-server: %v", err)
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	r.set(cmd, done)
	deadline := time.Now().Add(10 * time.Second)
	for {
		if err := redisPing(r.Addr); err == nil {
			return
		} else if time.Now().After(deadline) {
			log, _ := os.ReadFile(filepath.Join(r.dir, "redis.log"))
			t.Fatalf("redis-server on %s not ready: %v\n%s", r.Addr, err, log)
		}
		select {
		case <-done:
			log, _ := os.ReadFile(filepath.Join(r.dir, "redis.log"))
			t.Fatalf("redis-server exited early\n%s", log)
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// Pause stops the server with SIGSTOP: connections are accepted by the
// kernel, but nothing answers. Resume undoes it.
func (r *Redis) Pause() { r.signal(syscall.SIGSTOP) }

// Resume continues a paused server.
func (r *Redis) Resume() { r.signal(syscall.SIGCONT) }

// Restart starts the server again on the same port (after Kill), empty.
func (r *Redis) Restart(t testing.TB) {
	t.Helper()
	r.Kill()
	r.start(t)
}

// redisPing sends one inline PING and expects +PONG.
func redisPing(addr string) error {
	c, err := net.DialTimeout("tcp", addr, time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(time.Second))
	if _, err := c.Write([]byte("PING\r\n")); err != nil {
		return err
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return err
	}
	if !strings.HasPrefix(line, "+PONG") {
		return fmt.Errorf("unexpected reply %q", strings.TrimSpace(line))
	}
	return nil
}
