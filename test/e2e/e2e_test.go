// Package e2e runs shoal end to end: real `shoal node` processes, each beside
// its own real containerd, on loopback. Upstream is a dead port, so every
// byte a pull gets comes from the nodes.
package e2e

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/shoal-oci/shoal/test/harness"
)

// shoalBin is the shoal binary TestMain built; empty if the build failed.
var shoalBin string

// buildErr is why the build failed.
var buildErr error

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "shoal-e2e-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "e2e:", err)
		os.Exit(1)
	}
	shoalBin, buildErr = harness.BuildShoal(dir) // with -race when the tests have it
	code := m.Run()
	_ = os.RemoveAll(dir)
	os.Exit(code)
}

// deadUpstream is where containerd would go if the mirror failed: nothing listens.
const deadUpstream = "http://127.0.0.1:1"

// site is one simulated node: a containerd and the shoal node beside it.
type site struct {
	name  string
	ctrd  *harness.Containerd
	shoal *harness.ShoalNode
}

// startSites starts one containerd and one shoal node per version, the
// later nodes bootstrapping from every earlier one, and points each
// containerd at its own node through `shoal configure`.
func startSites(t *testing.T, versions ...harness.ContainerdVersion) []*site {
	t.Helper()
	return startSitesArgs(t, nil, versions...)
}

// startSitesArgs is startSites with extra flags for every node.
func startSitesArgs(t *testing.T, args []string, versions ...harness.ContainerdVersion) []*site {
	t.Helper()
	bin := requireShoal(t)
	var sites []*site
	var routers []string
	for i, v := range versions {
		name := string(rune('A' + i))
		c := harness.StartContainerd(t, v)
		n := harness.StartShoalNode(t, harness.NodeOptions{
			Bin: bin, Name: name, Containerd: c, BootstrapPeers: routers, Args: args,
		})
		routers = append(routers, n.RouterAddr)
		s := &site{name: name, ctrd: c, shoal: n}
		configureMirror(t, bin, s)
		sites = append(sites, s)
	}
	waitMesh(t, sites)
	return sites
}

func requireShoal(t *testing.T) string {
	t.Helper()
	harness.RequireRoot(t)
	if buildErr != nil {
		t.Fatalf("build shoal: %v", buildErr)
	}
	return shoalBin
}

// waitMesh waits until every node's DHT routing table knows every other node.
func waitMesh(t *testing.T, sites []*site) {
	t.Helper()
	want := float64(len(sites) - 1)
	eventually(t, 15*time.Second, "DHT mesh", func() error {
		for _, s := range sites {
			v, err := s.shoal.MetricErr("shoal_dht_peers")
			if err != nil {
				return err
			}
			if v < want {
				return fmt.Errorf("node %s has %v peers, want %v", s.name, v, want)
			}
		}
		return nil
	})
}

// configureMirror writes the site's hosts.toml for docker.io with the real
// `shoal configure`, over a pre-existing file whose server is the dead port
// (configure keeps an existing server as the fallback).
func configureMirror(t *testing.T, bin string, s *site) {
	t.Helper()
	dir := filepath.Join(s.ctrd.CertsDir, "docker.io")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "hosts.toml"), []byte(fmt.Sprintf("server = %q\n", deadUpstream)), 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(bin, "configure",
		"--containerd-certs-dir", s.ctrd.CertsDir,
		"--mirror-url", s.shoal.URL(),
		"--mirrored-registries", "docker.io").CombinedOutput()
	if err != nil {
		t.Fatalf("shoal configure: %v\n%s", err, out)
	}
	b, err := os.ReadFile(filepath.Join(dir, "hosts.toml"))
	if err != nil {
		t.Fatal(err)
	}
	hosts := string(b)
	if !strings.Contains(hosts, fmt.Sprintf("server = %q", deadUpstream)) {
		t.Fatalf("shoal configure did not keep the dead upstream as server:\n%s", hosts)
	}
	if !strings.Contains(hosts, s.shoal.URL()) {
		t.Fatalf("shoal configure did not add the mirror %s:\n%s", s.shoal.URL(), hosts)
	}
}

// importImage writes img as an OCI layout tar named ref and imports it into c.
func importImage(t *testing.T, c *harness.Containerd, img v1.Image, ref string) {
	t.Helper()
	c.Import(t, harness.WriteOCILayoutTar(t, img, ref))
}

// pull pulls ref into the site's containerd through its hosts dir (the mirror).
func pull(t *testing.T, s *site, ref string) {
	t.Helper()
	if out, err := pullErr(s, ref); err != nil {
		t.Fatalf("pull %s on %s: %v\n%s", ref, s.name, err, out)
	}
}

func pullErr(s *site, ref string) (string, error) {
	return s.ctrd.CtrErr("images", "pull", "--hosts-dir", s.ctrd.CertsDir, ref)
}

// imageDigests returns the digests of img's manifest, config and layers.
func imageDigests(t *testing.T, img v1.Image) (manifest, config v1.Hash, layers []v1.Hash) {
	t.Helper()
	var err error
	if manifest, err = img.Digest(); err != nil {
		t.Fatal(err)
	}
	if config, err = img.ConfigName(); err != nil {
		t.Fatal(err)
	}
	ls, err := img.Layers()
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range ls {
		d, err := l.Digest()
		if err != nil {
			t.Fatal(err)
		}
		layers = append(layers, d)
	}
	return manifest, config, layers
}

// requireContent checks that every digest of img is in the site's content
// store and that the stored bytes hash to it: a byte-identical copy.
func requireContent(t *testing.T, s *site, img v1.Image) {
	t.Helper()
	m, c, ls := imageDigests(t, img)
	for _, d := range append([]v1.Hash{m, c}, ls...) {
		p := filepath.Join(s.ctrd.Root, "io.containerd.content.v1.content", "blobs", d.Algorithm, d.Hex)
		f, err := os.Open(p)
		if err != nil {
			t.Fatalf("%s: content %s missing: %v", s.name, d, err)
		}
		h := sha256.New()
		_, err = io.Copy(h, f)
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
		if got := hex.EncodeToString(h.Sum(nil)); got != d.Hex {
			t.Fatalf("%s: content %s hashes to sha256:%s", s.name, d, got)
		}
	}
	// The manifest bytes are identical to the source's.
	raw, err := img.RawManifest()
	if err != nil {
		t.Fatal(err)
	}
	got := s.ctrd.Ctr(t, "content", "get", m.String())
	if got != string(raw) {
		t.Fatalf("%s: manifest bytes differ from the source", s.name)
	}
}

// eventually retries f every 100ms until it returns nil or timeout passes.
func eventually(t *testing.T, timeout time.Duration, what string, f func() error) {
	t.Helper()
	harness.Eventually(t, timeout, what, f)
}

// request sends method to url with headers and returns the response with its
// body read, failing the test on a transport error.
func request(t *testing.T, method, url string, hdr ...string) (*http.Response, []byte) {
	t.Helper()
	return harness.Request(t, method, url, hdr...)
}

func requestErr(method, url string, hdr ...string) (*http.Response, []byte, error) {
	return harness.RequestErr(method, url, hdr...)
}

// requireNoPanic fails if any node logged a panic or a data race (the
// daemons are built with -race when the tests are).
func requireNoPanic(t *testing.T, sites ...*site) {
	t.Helper()
	nodes := make([]*harness.ShoalNode, len(sites))
	for i, s := range sites {
		nodes[i] = s.shoal
	}
	requireNoPanicNodes(t, nodes...)
}

// requireNoPanicNodes fails the test if a node logged a panic or a race.
func requireNoPanicNodes(t *testing.T, nodes ...*harness.ShoalNode) {
	t.Helper()
	for _, n := range nodes {
		log := n.Log()
		if strings.Contains(strings.ToLower(log), "panic") {
			t.Errorf("node %s logged a panic", n.Name)
		}
		if strings.Contains(log, "WARNING: DATA RACE") {
			t.Errorf("node %s reported a data race", n.Name)
		}
	}
}
