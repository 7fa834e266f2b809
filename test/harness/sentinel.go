package harness

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// SentinelMaster is the name the Sentinels monitor.
const SentinelMaster = "shoal"

// Sentinel is a Redis primary, one replica and three Redis Sentinels
// (quorum 2, a primary is down after 1 s without an answer), owned by one
// test. URL is the failover form shoal's --redis-url takes.
type Sentinel struct {
	URL     string
	Primary *Redis
	Replica *Redis
	addrs   []string // the Sentinels'
}

// StartSentinel starts the set and waits until every Sentinel knows the
// replica and the other Sentinels. The processes stop in t.Cleanup.
func StartSentinel(t testing.TB) *Sentinel {
	t.Helper()
	bin := Binary(t, "SHOAL_REDIS_SENTINEL_BIN", "redis-sentinel")
	primary := StartRedisServer(t)
	replica := &Redis{bin: primary.bin, dir: t.TempDir(), port: FreePort(t),
		args: []string{"--replicaof", "127.0.0.1", strconv.Itoa(primary.port)}}
	replica.Addr = net.JoinHostPort("127.0.0.1", strconv.Itoa(replica.port))
	replica.URL = fmt.Sprintf("redis://%s/0", replica.Addr)
	t.Cleanup(replica.Kill)
	replica.start(t)

	s := &Sentinel{Primary: primary, Replica: replica}
	for i := range 3 {
		port := FreePort(t)
		dir := t.TempDir()
		conf := filepath.Join(dir, "sentinel.conf")
		cfg := fmt.Sprintf(`port %d
bind 127.0.0.1
dir %s
logfile %s
sentinel monitor %s 127.0.0.1 %d 2
sentinel down-after-milliseconds %s 1000
sentinel failover-timeout %s 5000
sentinel parallel-syncs %s 1
`, port, dir, filepath.Join(dir, "sentinel.log"), SentinelMaster, primary.port, SentinelMaster, SentinelMaster, SentinelMaster)
		if err := os.WriteFile(conf, []byte(cfg), 0o644); err != nil {
			t.Fatal(err)
		}
		if _, err := Spawn(t, exec.Command(bin, conf), syscall.SIGKILL, time.Second); err != nil {
			t.Fatalf("start sentinel %d: %v", i, err)
		}
		s.addrs = append(s.addrs, net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
	}
	s.URL = fmt.Sprintf("redis://%s/0?master_name=%s&addr=%s&addr=%s", s.addrs[0], SentinelMaster, s.addrs[1], s.addrs[2])

	deadline := time.Now().Add(20 * time.Second)
	for _, a := range s.addrs {
		c := redis.NewSentinelClient(&redis.Options{Addr: a})
		for {
			err := s.sentinelReady(c)
			if err == nil {
				break
			}
			if time.Now().After(deadline) {
				c.Close()
				t.Fatalf("sentinel %s not ready: %v", a, err)
			}
			time.Sleep(50 * time.Millisecond)
		}
		c.Close()
	}
	return s
}

// sentinelReady reports whether a Sentinel knows the replica and both
// other Sentinels, so that it can take part in a failover.
func (s *Sentinel) sentinelReady(c *redis.SentinelClient) error {
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	replicas, err := c.Replicas(ctx, SentinelMaster).Result()
	if err != nil {
		return err
	}
	if len(replicas) != 1 {
		return fmt.Errorf("%d replicas known", len(replicas))
	}
	others, err := c.Sentinels(ctx, SentinelMaster).Result()
	if err != nil {
		return err
	}
	if len(others) != 2 {
		return fmt.Errorf("%d other sentinels known", len(others))
	}
	return nil
}

// MasterAddr returns the primary's address as the first Sentinel that
// answers sees it.
func (s *Sentinel) MasterAddr() (string, error) {
	var last error
	for _, a := range s.addrs {
		c := redis.NewSentinelClient(&redis.Options{Addr: a})
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		hp, err := c.GetMasterAddrByName(ctx, SentinelMaster).Result()
		cancel()
		c.Close()
		if err == nil && len(hp) == 2 {
			return net.JoinHostPort(hp[0], hp[1]), nil
		}
		last = err
	}
	return "", fmt.Errorf("no sentinel answers: %v", last)
}
