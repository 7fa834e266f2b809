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
	"testing"
	"time"

	ma "github.com/multiformats/go-multiaddr"
)

// ShoalPackage is the import path of the shoal command.
const ShoalPackage = "github.com/shoal-oci/shoal"

// BuildShoal builds the shoal binary into dir and returns its path. It is
// meant for TestMain, so that a test package builds the binary once. When
// the tests run with -race, so does the binary (a later "-race=false" in
// buildFlags turns that off, for benchmarks). Extra go build flags come from
// buildFlags.
func BuildShoal(dir string, buildFlags ...string) (string, error) {
	out := filepath.Join(dir, "shoal")
	args := []string{"build"}
	if raceEnabled {
		args = append(args, "-race")
	}
	args = append(args, buildFlags...)
	args = append(args, "-o", out, ShoalPackage)
	cmd := exec.Command("go", args...)
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("go build %s: %w", ShoalPackage, err)
	}
	return out, nil
}

// TestPSK is the pre-shared key (64 hex characters) of the private network
// that test nodes join unless NodeOptions.NoPSK is set. It is a test key.
const TestPSK = "5368616c6c2074657374206e6574776f726b206b6579206f6e6c792c20c3b8c3"

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
	// NoPSK runs the node outside the test PSK network. By default every
	// node of a test joins one private network (TestPSK), as the chart's
	// nodes do, which also lets peers answer tags.
	NoPSK bool
	// Args are extra command-line flags.
	Args []string
	// NetNS runs the node inside this network namespace (ip netns exec),
	// listening on ListenIP, which must be one of the namespace's addresses.
	NetNS    string
	ListenIP string
}

// ShoalNode is a running `shoal node` process owned by one test.
type ShoalNode struct {
	*Proc
	RegistryAddr string // 127.0.0.1:P
	PeerAddr     string // 127.0.0.1:R, where other nodes fetch; empty with NoRouter
	RouterAddr   string // 127.0.0.1:Q, empty with NoRouter
	DataDir      string
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
	ip := "127.0.0.1"
	if o.ListenIP != "" {
		ip = o.ListenIP
	}
	n := &ShoalNode{
		Proc:    newProc("node", o.Name, dir),
		DataDir: filepath.Join(dir, "data"),
	}
	// Every port is 0: the node reports what it bound (--addr-file).
	any0 := net.JoinHostPort(ip, "0")
	router, peer := any0, any0
	if o.NoRouter {
		router, peer = "", ""
	}
	args := []string{"node",
		"--registry-addr", any0,
		"--router-addr", router,
		"--peer-addr", peer,
		"--metrics-addr", any0,
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
	if !o.NoRouter && !o.NoPSK {
		psk := filepath.Join(dir, "swarm.key")
		if err := os.WriteFile(psk, []byte(TestPSK+"\n"), 0o600); err != nil {
			t.Fatalf("write psk: %v", err)
		}
		args = append(args, "--psk-file", psk)
	}
	if len(o.BootstrapPeers) > 0 {
		args = append(args, "--bootstrap-peers", strings.Join(o.BootstrapPeers, ","))
	}
	args = append(args, o.Args...)

	bin := o.Bin
	if o.NetNS != "" {
		// ip netns exec execs the binary, so the PID stays the node's.
		args = append([]string{"netns", "exec", o.NetNS, o.Bin}, args...)
		bin = "ip"
	}
	n.start(t, bin, args)
	n.RegistryAddr, n.PeerAddr = n.Addrs.Registry, n.Addrs.Peer
	if !o.NoRouter {
		n.RouterAddr = routerHostPort(t, n.Addrs.Router, ip)
	}
	return n
}

// routerHostPort picks, from the multiaddrs a node reported as its DHT
// addresses, the one on ip, as host:port.
func routerHostPort(t testing.TB, addrs []string, ip string) string {
	t.Helper()
	for _, s := range addrs {
		m, err := ma.NewMultiaddr(s)
		if err != nil {
			continue
		}
		host, errIP := m.ValueForProtocol(ma.P_IP4)
		port, errTCP := m.ValueForProtocol(ma.P_TCP)
		if errIP == nil && errTCP == nil && host == ip {
			return net.JoinHostPort(ip, port)
		}
	}
	t.Fatalf("no DHT address on %s among %v", ip, addrs)
	return ""
}

// FilteredEnv is the environment without the variables that start with prefix.
func FilteredEnv(prefix string) []string {
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
