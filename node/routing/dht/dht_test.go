package dht

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-msgio"
	ma "github.com/multiformats/go-multiaddr"
	manet "github.com/multiformats/go-multiaddr/net"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/shoal-oci/shoal/node/routing"
	"github.com/shoal-oci/shoal/node/routing/dht/wire"
	"github.com/shoal-oci/shoal/node/routing/routingtest"
	"github.com/shoal-oci/shoal/test/harness"
)

const testTTL = 2 * time.Second

// testConfig is a loopback node with short timers.
func testConfig(bootstrap ...string) Config {
	return Config{
		ListenAddr:        "127.0.0.1:0",
		RegistryAddr:      "127.0.0.1:5000",
		BootstrapPeers:    bootstrap,
		BootstrapInterval: 200 * time.Millisecond,
		ProviderTTL:       testTTL,
		DialTimeout:       time.Second,
		LookupTimeout:     3 * time.Second,
		Registerer:        prometheus.NewRegistry(),
	}
}

func start(t *testing.T, cfg Config) *Router {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	r, err := New(ctx, cfg)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() {
		if err := r.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return r
}

// hostPort returns the node's loopback TCP address as "127.0.0.1:port".
func hostPort(t *testing.T, r *Router) string {
	t.Helper()
	for _, a := range r.host.Addrs() {
		na, err := manet.ToNetAddr(a)
		if err == nil {
			return na.String()
		}
	}
	t.Fatalf("no TCP address in %v", r.host.Addrs())
	return ""
}

func waitFor(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting until %s", timeout, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// startNetwork starts n nodes; all but the first bootstrap from the first
// by "127.0.0.1:port" (no peer ID).
func startNetwork(t *testing.T, n int, mutate func(i int, cfg *Config)) []*Router {
	t.Helper()
	rs := make([]*Router, n)
	for i := range rs {
		cfg := testConfig()
		cfg.RegistryAddr = fmt.Sprintf("127.0.0.1:%d", 5000+i)
		if i > 0 {
			cfg.BootstrapPeers = []string{hostPort(t, rs[0])}
		}
		if mutate != nil {
			mutate(i, &cfg)
		}
		rs[i] = start(t, cfg)
	}
	for i, r := range rs {
		waitFor(t, 10*time.Second, fmt.Sprintf("node %d ready", i), r.Ready)
	}
	return rs
}

func lookupIDs(t *testing.T, r *Router, key string) []string {
	t.Helper()
	peers, err := r.Lookup(context.Background(), key, 10)
	if err != nil {
		t.Fatalf("Lookup: %v", err)
	}
	var ids []string
	for _, p := range peers {
		ids = append(ids, p.ID)
	}
	return ids
}

func TestConformance(t *testing.T) {
	routingtest.Conformance(t, func(t *testing.T, n int) []routingtest.Router {
		rs := startNetwork(t, n, nil)
		out := make([]routingtest.Router, n)
		for i, r := range rs {
			out[i] = r
		}
		return out
	})
}

func TestIdentityPersistsAcrossRestart(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "data")
	cfg := testConfig()
	cfg.DataDir = dir
	cfg.Registerer = nil
	first, err := New(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	id := first.ID()
	if err := first.Close(); err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(filepath.Join(dir, identityFile))
	if err != nil {
		t.Fatalf("identity file: %v", err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Fatalf("identity file mode = %v, want 0600", fi.Mode().Perm())
	}
	second := start(t, cfg)
	if second.ID() != id {
		t.Fatalf("peer ID changed across restart: %s then %s", id, second.ID())
	}
	other := testConfig()
	other.DataDir = t.TempDir()
	if third := start(t, other); third.ID() == id {
		t.Fatal("a different data dir produced the same peer ID")
	}
}

func TestPrivateNetwork(t *testing.T) {
	pskA := bytes.Repeat([]byte{1}, 32)
	pskB := bytes.Repeat([]byte{2}, 32)
	rs := startNetwork(t, 2, func(i int, cfg *Config) { cfg.PSK = pskA })
	outsider := start(t, testConfig(hostPort(t, rs[0])))
	cfg := testConfig(hostPort(t, rs[0]))
	cfg.PSK = pskB
	wrongKey := start(t, cfg)

	key := "sha256:psk-test"
	if err := rs[0].Advertise(context.Background(), []string{key}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 5*time.Second, "same-PSK node finds the provider", func() bool {
		return slices.Contains(lookupIDs(t, rs[1], key), rs[0].ID())
	})
	// Give the outsiders several bootstrap rounds.
	time.Sleep(time.Second)
	for name, r := range map[string]*Router{"no PSK": outsider, "other PSK": wrongKey} {
		if r.Ready() {
			t.Errorf("%s: node joined a private network", name)
		}
		if got := lookupIDs(t, r, key); len(got) != 0 {
			t.Errorf("%s: node found providers %v", name, got)
		}
	}
}

func TestBootstrapForms(t *testing.T) {
	seed := start(t, testConfig())
	hp := hostPort(t, seed)
	_, port, _ := net.SplitHostPort(hp)
	tests := []struct {
		name  string
		entry string
	}{
		{name: "host_port_without_peer_id", entry: hp},
		{name: "multiaddr_without_peer_id", entry: "/ip4/127.0.0.1/tcp/" + port},
		{name: "multiaddr_with_peer_id", entry: "/ip4/127.0.0.1/tcp/" + port + "/p2p/" + seed.ID()},
		{name: "dns_name_with_port", entry: "localhost:" + port},
		{name: "dns_multiaddr_without_peer_id", entry: "/dns4/localhost/tcp/" + port},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := start(t, testConfig(tt.entry))
			waitFor(t, 5*time.Second, "connected to the seed", func() bool {
				return r.Ready() && slices.Contains(r.dht.RoutingTable().ListPeers(), seed.host.ID())
			})
		})
	}
}

func TestBootstrapRetriesUntilPeerAppears(t *testing.T) {
	// The late peer's port is known before it listens: one reserved below
	// the ephemeral range, which no outgoing connection can take meanwhile.
	port := strconv.Itoa(harness.FreePort(t))
	addr := "127.0.0.1:" + port
	r := start(t, testConfig("localhost:"+port)) // a DNS name, resolved again every round
	time.Sleep(300 * time.Millisecond)
	if r.Ready() {
		t.Fatal("ready before any peer exists")
	}
	cfg := testConfig()
	cfg.ListenAddr = addr
	late := start(t, cfg)
	waitFor(t, 5*time.Second, "the late peer is found by a later bootstrap round", func() bool {
		return r.Ready() && r.host.Network().Connectedness(late.host.ID()) == network.Connected
	})
}

func TestBootstrapListIncludingSelfIsHarmless(t *testing.T) {
	seed := start(t, testConfig())
	self := "127.0.0.1:" + strconv.Itoa(harness.FreePort(t)) // in its own bootstrap list, so known before it listens
	cfg := testConfig(self, hostPort(t, seed))
	cfg.ListenAddr = self
	r := start(t, cfg)
	waitFor(t, 5*time.Second, "connected to the seed", func() bool {
		return slices.Contains(r.dht.RoutingTable().ListPeers(), seed.host.ID())
	})
	time.Sleep(500 * time.Millisecond) // a few more rounds that dial itself
	if peers := r.dht.RoutingTable().ListPeers(); len(peers) != 1 || peers[0] != seed.host.ID() {
		t.Fatalf("routing table = %v, want only the seed", peers)
	}
}

func TestInvalidConfigIsRejected(t *testing.T) {
	tests := []struct {
		name string
		cfg  Config
	}{
		{name: "missing_registry_addr", cfg: Config{ListenAddr: "127.0.0.1:0"}},
		{name: "registry_addr_without_port", cfg: Config{ListenAddr: "127.0.0.1:0", RegistryAddr: "10.0.0.1"}},
		{name: "zone_with_space", cfg: Config{ListenAddr: "127.0.0.1:0", RegistryAddr: ":5000", Zone: "eu 1"}},
		{name: "short_psk", cfg: Config{ListenAddr: "127.0.0.1:0", RegistryAddr: ":5000", PSK: []byte("short")}},
		{name: "bad_bootstrap_multiaddr", cfg: Config{ListenAddr: "127.0.0.1:0", RegistryAddr: ":5000", BootstrapPeers: []string{"/ip4/nope"}}},
		{name: "bootstrap_without_port", cfg: Config{ListenAddr: "127.0.0.1:0", RegistryAddr: ":5000", BootstrapPeers: []string{"shoal-node.shoal.svc"}}},
		{name: "listen_on_hostname", cfg: Config{ListenAddr: "example.com:5001", RegistryAddr: ":5000"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r, err := New(context.Background(), tt.cfg)
			if err == nil {
				r.Close()
				t.Fatal("New accepted an invalid config")
			}
		})
	}
}

func TestDeadProviderStopsBeingReturned(t *testing.T) {
	// Records live an hour, far past the test: only the liveness check
	// can drop the dead node.
	rs := startNetwork(t, 3, func(_ int, cfg *Config) { cfg.ProviderTTL = time.Hour })
	key := "sha256:dead-provider"
	twoProviders(t, rs, key)
	dead := rs[1].ID()
	if err := rs[1].Close(); err != nil {
		t.Fatal(err)
	}
	// Its records have not expired, but once its connections are gone a
	// lookup cannot reach it, marks it dead, and from then on skips it
	// without dialling.
	waitFor(t, 2*time.Second, "lookups skip the dead node", func() bool {
		return !slices.Contains(lookupIDs(t, rs[2], key), dead)
	})
	if !rs[2].live.isDead(rs[1].host.ID()) {
		t.Fatal("the dead node is not marked dead")
	}
	// Node 0 never looked it up, yet it knows too: the closed connection
	// made it dial the peer again, off the request path.
	waitFor(t, 3*time.Second, "node 0 marks the dead node dead without a lookup", func() bool {
		return rs[0].live.isDead(rs[1].host.ID())
	})
	for range 3 {
		got := lookupIDs(t, rs[2], key)
		if slices.Contains(got, dead) {
			t.Fatalf("a later lookup returns the dead node: %v", got)
		}
		if !slices.Contains(got, rs[0].ID()) {
			t.Fatalf("live provider lost: %v", got)
		}
	}
}

func TestReprovideKeepsRecordsAliveForLateJoiners(t *testing.T) {
	rs := startNetwork(t, 3, nil)
	key := "sha256:reprovided"
	if err := rs[0].Advertise(context.Background(), []string{key}); err != nil {
		t.Fatal(err)
	}
	// Node 1 keeps finding node 0, through the DHT alone (its cache is
	// bypassed), for two TTLs: records outlive one TTL while advertised.
	end := time.Now().Add(2 * testTTL)
	for time.Now().Before(end) {
		waitFor(t, testTTL, "node 1 finds node 0 by a DHT query", func() bool {
			return slices.Contains(dhtLookupIDs(t, rs[1], key), rs[0].ID())
		})
		time.Sleep(100 * time.Millisecond)
	}
	late := start(t, withBootstrap(testConfig(), hostPort(t, rs[2])))
	waitFor(t, 10*time.Second, "late node ready", late.Ready)
	// The DHT itself, not the late node's cache (which its peers' holdings
	// fill), must still hold the record.
	waitFor(t, 5*time.Second, "the late node finds node 0 by a DHT query", func() bool {
		return slices.Contains(dhtLookupIDs(t, late, key), rs[0].ID())
	})
}

// A node that joins after the others announced their content learns it
// from their holdings when it connects, and answers lookups from its cache.
func TestLateJoinerFetchesHoldings(t *testing.T) {
	rs := startNetwork(t, 2, nil)
	keys := make([]string, wire.MaxKeys+10) // two messages
	for i := range keys {
		keys[i] = fmt.Sprintf("sha256:held-%d", i)
	}
	waitForMesh(t, rs)
	if err := rs[0].Advertise(context.Background(), keys); err != nil {
		t.Fatal(err)
	}
	// Only once the announcement is out does the late node start: it has
	// missed it.
	waitFor(t, 10*time.Second, "node 1 hears node 0's announcement", func() bool {
		return len(rs[1].cache.get(wire.HashKey(keys[len(keys)-1]))) == 1
	})
	late := start(t, withBootstrap(testConfig(), hostPort(t, rs[0])))
	waitFor(t, 10*time.Second, "late node ready", late.Ready)
	waitFor(t, 10*time.Second, "the late node knows all of node 0's keys", func() bool {
		for _, k := range []string{keys[0], keys[len(keys)-1]} {
			if !slices.Contains(late.cache.get(wire.HashKey(k)), rs[0].host.ID()) {
				return false
			}
		}
		return true
	})
	reg := late.cfg.Registerer.(*prometheus.Registry)
	if n := counterValue(t, reg, "shoal_dht_announcements_total", "fetched"); n < 2 {
		t.Errorf("holdings messages fetched = %v, want at least 2", n)
	}
	before := counterValue(t, reg, "shoal_dht_lookups_total", "cache")
	if got := lookupIDs(t, late, keys[7]); !slices.Equal(got, []string{rs[0].ID()}) {
		t.Fatalf("lookup = %v, want node 0", got)
	}
	if after := counterValue(t, reg, "shoal_dht_lookups_total", "cache"); after != before+1 {
		t.Errorf("cache-answered lookups went %v -> %v, want +1", before, after)
	}
}

// A peer's holdings answer is bounded: one that claims more keys than the
// cache holds is cut off, and one that sends garbage is refused.
func TestHoldingsFromALyingPeerAreBounded(t *testing.T) {
	cfg := testConfig()
	cfg.ProviderCacheKeys = 2 * wire.MaxKeys
	r := start(t, cfg)
	liar := start(t, testConfig())
	for _, tc := range []struct {
		name string
		msgs [][]byte
	}{
		{"too many keys", wire.Encode(wire.OpAdd, make([]keyHash, 3*wire.MaxKeys))},
		{"garbage", [][]byte{{1, 2, 3}}},
		{"a removal", wire.Encode(wire.OpRemove, make([]keyHash, 1))},
	} {
		t.Run(tc.name, func(t *testing.T) {
			liar.host.SetStreamHandler(holdingsProtocol, func(s network.Stream) {
				defer s.Close()
				w := msgio.NewVarintWriter(s)
				for _, m := range tc.msgs {
					if err := w.WriteMsg(m); err != nil {
						return
					}
				}
			})
			if err := r.host.Connect(context.Background(), peer.AddrInfo{ID: liar.host.ID(), Addrs: liar.host.Addrs()}); err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			n, err := r.fetchHoldings(ctx, liar.host.ID())
			if err == nil {
				t.Fatalf("accepted (%d keys)", n)
			}
			if n > cfg.ProviderCacheKeys {
				t.Errorf("added %d keys, over the cache's %d", n, cfg.ProviderCacheKeys)
			}
		})
	}
}

// An advertisement reaches the other nodes as an announcement: their
// lookups are answered from the cache, with no DHT query.
func TestAnnouncementsAnswerLookupsFromCache(t *testing.T) {
	rs := startNetwork(t, 3, nil)
	waitForMesh(t, rs)
	keys := []string{"sha256:announced-1", "sha256:announced-2"}
	// Announcements are best effort: advertise again until both nodes
	// have heard it (Advertise is idempotent).
	var last time.Time
	waitFor(t, 10*time.Second, "the announcement reaches both caches", func() bool {
		if time.Since(last) > 500*time.Millisecond {
			if err := rs[0].Advertise(context.Background(), keys); err != nil {
				t.Fatal(err)
			}
			last = time.Now()
		}
		return len(rs[1].cache.get(wire.HashKey(keys[1]))) == 1 && len(rs[2].cache.get(wire.HashKey(keys[1]))) == 1
	})
	for _, r := range rs[1:] {
		reg := r.cfg.Registerer.(*prometheus.Registry)
		before := counterValue(t, reg, "shoal_dht_lookups_total", "cache")
		if got := lookupIDs(t, r, keys[0]); !slices.Equal(got, []string{rs[0].ID()}) {
			t.Fatalf("lookup = %v, want node 0", got)
		}
		if after := counterValue(t, reg, "shoal_dht_lookups_total", "cache"); after != before+1 {
			t.Errorf("cache-answered lookups went %v -> %v, want +1", before, after)
		}
		if dht := counterValue(t, reg, "shoal_dht_lookups_total", "dht"); dht != 0 {
			t.Errorf("%v lookups needed a DHT query", dht)
		}
	}
}

// A withdrawal is announced: other nodes stop returning the withdrawer at
// once, long before its DHT records expire, and DHT records do not bring
// it back. Advertising again does.
func TestWithdrawIsAnnounced(t *testing.T) {
	rs := startNetwork(t, 2, func(_ int, cfg *Config) { cfg.ProviderTTL = time.Hour })
	waitForMesh(t, rs)
	key := "sha256:withdrawn"
	if err := rs[0].Advertise(context.Background(), []string{key}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 5*time.Second, "node 1 finds node 0", func() bool {
		return slices.Contains(lookupIDs(t, rs[1], key), rs[0].ID())
	})
	// Announcements are best effort (gossipsub may drop a message on a
	// loaded machine), so the withdrawal is repeated until it lands; what
	// this proves is that a withdrawal that lands takes effect at once.
	var last time.Time
	waitFor(t, 10*time.Second, "node 1 stops returning node 0", func() bool {
		if time.Since(last) > 500*time.Millisecond {
			if err := rs[0].Withdraw(context.Background(), []string{key}); err != nil {
				t.Fatal(err)
			}
			last = time.Now()
		}
		return len(lookupIDs(t, rs[1], key)) == 0
	})
	// The DHT still holds node 0's record (TTL 1h), yet lookups stay empty.
	if got := dhtLookupIDs(t, rs[1], key); !slices.Contains(got, rs[0].ID()) {
		t.Fatalf("the DHT record is gone already (%v): the test proves nothing", got)
	}
	if got := lookupIDs(t, rs[1], key); len(got) != 0 {
		t.Fatalf("after the withdrawal node 1 still finds %v", got)
	}
	if err := rs[0].Advertise(context.Background(), []string{key}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 5*time.Second, "node 1 finds node 0 again", func() bool {
		return slices.Contains(lookupIDs(t, rs[1], key), rs[0].ID())
	})
}

// Forget (a holder answered 404) keeps that holder out of lookups for the
// key, even though its DHT record says otherwise; other holders stay.
func TestForgetDropsAStaleHolder(t *testing.T) {
	rs := startNetwork(t, 3, nil)
	key := "sha256:stale"
	twoProviders(t, rs, key)
	rs[2].Forget(key, rs[1].ID())
	for range 3 {
		if got := lookupIDs(t, rs[2], key); !slices.Equal(got, []string{rs[0].ID()}) {
			t.Fatalf("after Forget, lookup = %v, want only node 0", got)
		}
	}
}

// twoProviders has nodes 0 and 1 advertise key and waits until node 2's
// lookups return both.
func twoProviders(t *testing.T, rs []*Router, key string) {
	t.Helper()
	for _, r := range rs[:2] {
		if err := r.Advertise(context.Background(), []string{key}); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, 5*time.Second, "node 2 finds nodes 0 and 1", func() bool {
		got := lookupIDs(t, rs[2], key)
		return slices.Contains(got, rs[0].ID()) && slices.Contains(got, rs[1].ID())
	})
}

// dhtLookupIDs asks the DHT directly, past the provider cache.
func dhtLookupIDs(t *testing.T, r *Router, key string) []string {
	t.Helper()
	c, err := keyCID(key)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	var ids []string
	for info := range r.dht.FindProvidersAsync(ctx, c, 0) {
		if info.ID != r.host.ID() {
			ids = append(ids, info.ID.String())
		}
	}
	return ids
}

// waitForMesh waits until an announcement from each router reaches every
// other one. Gossipsub drops what is published before its streams to a
// peer are up, so each router announces a probe key until all have it.
func waitForMesh(t *testing.T, rs []*Router) {
	t.Helper()
	for i, r := range rs {
		probe := fmt.Sprintf("sha256:mesh-probe-%d", i)
		waitFor(t, 10*time.Second, fmt.Sprintf("node %d's announcements reach every node", i), func() bool {
			if err := r.Advertise(context.Background(), []string{probe}); err != nil {
				t.Fatal(err)
			}
			deadline := time.Now().Add(200 * time.Millisecond)
			for time.Now().Before(deadline) {
				all := true
				for j, o := range rs {
					if j != i && len(o.cache.get(wire.HashKey(probe))) == 0 {
						all = false
					}
				}
				if all {
					return true
				}
				time.Sleep(10 * time.Millisecond)
			}
			return false
		})
	}
}

func withBootstrap(cfg Config, peers ...string) Config {
	cfg.BootstrapPeers = peers
	return cfg
}

func TestLookupFillsAddrAndZone(t *testing.T) {
	rs := startNetwork(t, 2, func(i int, cfg *Config) {
		if i == 0 {
			cfg.RegistryAddr = ":5123"
			cfg.Zone = "eu-1a"
		}
	})
	key := "docker.io/library/alpine:3.20"
	if err := rs[0].Advertise(context.Background(), []string{key}); err != nil {
		t.Fatal(err)
	}
	want := routing.Peer{ID: rs[0].ID(), Addr: "http://127.0.0.1:5123", Zone: "eu-1a"}
	waitFor(t, 5*time.Second, "node 1 finds node 0 with its address and zone", func() bool {
		got, err := rs[1].Lookup(context.Background(), key, 5)
		return err == nil && len(got) == 1 && got[0] == want
	})
	got, _ := rs[0].Lookup(context.Background(), key, 5)
	if len(got) != 0 {
		t.Fatalf("node 0 found %v (want nothing: only itself provides)", got)
	}
}

func TestMetrics(t *testing.T) {
	reg := prometheus.NewRegistry()
	rs := startNetwork(t, 2, func(i int, cfg *Config) {
		if i == 1 {
			cfg.Registerer = reg
		}
	})
	r := rs[1]
	if err := r.Advertise(context.Background(), []string{"sha256:m1", "sha256:m2", "sha256:m3"}); err != nil {
		t.Fatal(err)
	}
	if err := r.Withdraw(context.Background(), []string{"sha256:m3"}); err != nil {
		t.Fatal(err)
	}
	if _, err := r.Lookup(context.Background(), "sha256:none", 3); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 3*time.Second, "peers gauge updated", func() bool { return gaugeValue(t, reg, "shoal_dht_peers") >= 1 })
	if v := gaugeValue(t, reg, "shoal_dht_advertised_keys"); v != 2 {
		t.Errorf("shoal_dht_advertised_keys = %v, want 2", v)
	}
	families := gather(t, reg)
	if h := families["shoal_dht_lookup_duration_seconds"]; h == nil || h.Metric[0].GetHistogram().GetSampleCount() != 1 {
		t.Errorf("lookup histogram = %v, want one sample", h)
	}
	if families["shoal_dht_provide_errors_total"] == nil {
		t.Error("shoal_dht_provide_errors_total not registered")
	}
}

func gather(t *testing.T, reg *prometheus.Registry) map[string]*dto.MetricFamily {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]*dto.MetricFamily{}
	for _, mf := range mfs {
		out[mf.GetName()] = mf
	}
	return out
}

func counterValue(t *testing.T, reg *prometheus.Registry, name, label string) float64 {
	t.Helper()
	mf := gather(t, reg)[name]
	if mf == nil {
		t.Fatalf("metric %s not registered", name)
	}
	for _, m := range mf.Metric {
		for _, lp := range m.Label {
			if lp.GetValue() == label {
				return m.GetCounter().GetValue()
			}
		}
	}
	t.Fatalf("metric %s has no series with label value %q", name, label)
	return 0
}

func gaugeValue(t *testing.T, reg *prometheus.Registry, name string) float64 {
	t.Helper()
	mf := gather(t, reg)[name]
	if mf == nil {
		t.Fatalf("metric %s not registered", name)
	}
	return mf.Metric[0].GetGauge().GetValue()
}

func TestListenMultiaddr(t *testing.T) {
	tests := []struct {
		in, want string
		wantErr  bool
	}{
		{in: "0.0.0.0:5001", want: "/ip4/0.0.0.0/tcp/5001"},
		{in: ":5001", want: "/ip4/0.0.0.0/tcp/5001"},
		{in: "[::1]:5001", want: "/ip6/::1/tcp/5001"},
		{in: "/ip4/127.0.0.1/tcp/0", want: "/ip4/127.0.0.1/tcp/0"},
		{in: "example.com:5001", wantErr: true},
		{in: "5001", wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			got, err := listenMultiaddr(tt.in)
			if tt.wantErr {
				if err == nil {
					t.Fatalf("want error, got %v", got)
				}
				return
			}
			if err != nil || !got.Equal(ma.StringCast(tt.want)) {
				t.Fatalf("got %v, %v; want %s", got, err, tt.want)
			}
		})
	}
}

func TestAgentRoundTrip(t *testing.T) {
	tests := []struct {
		name         string
		ua           string
		registry     string
		zone         string
		ok           bool
		connIP       string
		wantURL      string
		wantURLError bool
	}{
		{name: "registry_and_zone", ua: agentString("10.0.0.7:5000", "eu-1a"), registry: "10.0.0.7:5000", zone: "eu-1a", ok: true, connIP: "10.0.0.7", wantURL: "http://10.0.0.7:5000"},
		{name: "registry_on_another_host_is_refused", ua: agentString("10.0.0.7:5000", ""), registry: "10.0.0.7:5000", ok: true, connIP: "10.9.9.9", wantURLError: true},
		{name: "registry_by_name_is_refused", ua: agentString("evil.example:443", ""), registry: "evil.example:443", ok: true, connIP: "10.9.9.9", wantURLError: true},
		{name: "no_zone", ua: agentString(":5000", ""), registry: ":5000", ok: true, connIP: "10.0.0.8", wantURL: "http://10.0.0.8:5000"},
		{name: "unspecified_host_uses_conn_ip", ua: agentString("0.0.0.0:5000", ""), registry: "0.0.0.0:5000", ok: true, connIP: "10.0.0.9", wantURL: "http://10.0.0.9:5000"},
		{name: "ipv6_conn_ip", ua: agentString("[::]:5000", ""), registry: "[::]:5000", ok: true, connIP: "fd00::1", wantURL: "http://[fd00::1]:5000"},
		{name: "no_conn_ip", ua: agentString(":5000", ""), registry: ":5000", ok: true, wantURLError: true},
		{name: "not_shoal", ua: "kubo/0.30.0", ok: false},
		{name: "shoal_without_registry", ua: "shoal/1 zone=a", zone: "a", ok: false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			registry, zone, ok := parseAgent(tt.ua)
			if registry != tt.registry || zone != tt.zone || ok != tt.ok {
				t.Fatalf("parseAgent(%q) = %q, %q, %v", tt.ua, registry, zone, ok)
			}
			if !ok {
				return
			}
			url, err := registryURL(registry, net.ParseIP(tt.connIP))
			if tt.wantURLError {
				if err == nil {
					t.Fatalf("want error, got %s", url)
				}
				return
			}
			if err != nil || url != tt.wantURL {
				t.Fatalf("registryURL = %q, %v; want %q", url, err, tt.wantURL)
			}
		})
	}
}

func TestKeyCIDIsStable(t *testing.T) {
	a, err := keyCID("sha256:abc")
	if err != nil {
		t.Fatal(err)
	}
	b, _ := keyCID("sha256:abc")
	c, _ := keyCID("sha256:abd")
	if !a.Equals(b) || a.Equals(c) {
		t.Fatalf("keyCID not a function of the key: %s %s %s", a, b, c)
	}
	if a.Prefix().Codec != 0x55 || a.Prefix().MhType != 0x12 || a.Version() != 1 {
		t.Fatalf("CID prefix = %+v, want v1 raw sha2-256", a.Prefix())
	}
}

// TestPeerDialsTheAddressesGiven: a peer this node has never heard of, and
// that no DHT it is in knows, is reached at the addresses the cache tier
// passed on; without them it is not, and an address that leads to another
// peer does not pass as it.
func TestPeerDialsTheAddressesGiven(t *testing.T) {
	target, other := start(t, testConfig()), start(t, testConfig())
	hints := func(r *Router, id string) []string {
		var out []string
		for _, a := range r.DialAddrs() {
			out = append(out, a+"/p2p/"+id)
		}
		return out
	}
	if len(target.DialAddrs()) == 0 {
		t.Fatal("no dial addresses")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := start(t, testConfig()).Peer(ctx, target.ID(), nil); err == nil {
		t.Fatal("an unknown peer was reached without addresses")
	}
	if _, err := start(t, testConfig()).Peer(ctx, target.ID(), hints(other, target.ID())); err == nil {
		t.Fatal("another peer's address passed as the target")
	}
	p, err := start(t, testConfig()).Peer(ctx, target.ID(), append([]string{"/ip4/127.0.0.1/tcp/1/p2p/" + other.ID(), "not a multiaddr"}, hints(target, target.ID())...))
	if err != nil {
		t.Fatalf("Peer with the target's addresses: %v", err)
	}
	if p.ID != target.ID() || p.Addr != "http://127.0.0.1:5000" {
		t.Fatalf("peer %+v", p)
	}
}
