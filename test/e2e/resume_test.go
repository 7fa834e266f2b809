package e2e

import (
	"archive/tar"
	"bufio"
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"net/http"
	"os"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/static"
	"github.com/google/go-containerregistry/pkg/v1/types"

	"github.com/shoal-oci/shoal/test/harness"
)

// bigLayerSize is the size of the blob whose peer dies mid-transfer.
const bigLayerSize = 128 << 20

// (b) The peer serving a large blob is killed mid-transfer; the transfer
// resumes on the other peer that holds it (Range), and the bytes match. It
// runs twice: through B's default (zero-copy) relay, then, with a fresh pair
// of holders, through a node running --verify-blobs (the hashing relay). A
// ctr pull on B afterwards completes from a surviving peer.
func TestPeerKilledMidTransfer(t *testing.T) {
	// One peer at a time: this is the resume path. A striped fetch moves a
	// killed holder's segments instead (stripe_test.go).
	oneAtATime := []string{"--stripe-max-peers", "1"}
	sites := startSitesArgs(t, oneAtATime, harness.ContainerdV2, harness.ContainerdV2, harness.ContainerdV2)
	a, b, c := sites[0], sites[1], sites[2]

	t0 := time.Now()
	layer := bigLayer(t, bigLayerSize)
	img := harness.ImageWithLayers(t, layer)
	const ref = "docker.io/library/big:v1"
	tarPath := harness.WriteOCILayoutTar(t, img, ref)
	a.ctrd.Import(t, tarPath)
	c.ctrd.Import(t, tarPath)
	t.Logf("image of %d MiB built and imported on A and C in %s", bigLayerSize>>20, time.Since(t0).Round(time.Millisecond))
	ld, err := layer.Digest()
	if err != nil {
		t.Fatal(err)
	}
	holders := []*harness.ShoalNode{a.shoal, c.shoal}
	waitAdvertised(t, holders...)

	// Round 1: B's default relay.
	killed := killMidTransfer(t, b.shoal, holders, "library/big", ld.String())
	if v := b.shoal.Metric(t, "shoal_node_resumed_transfers_total"); v < 1 {
		t.Errorf("shoal_node_resumed_transfers_total on B = %v, want >= 1", v)
	}

	// Round 2: a new node in place of the killed one, on the same
	// containerd, and a relaying node with --verify-blobs (it serves an
	// OCI layout without the big image).
	var killedSite, otherSite *site
	for _, s := range []*site{a, c} {
		if s.shoal == killed {
			killedSite = s
		} else {
			otherSite = s
		}
	}
	peers := []string{a.shoal.RouterAddr, b.shoal.RouterAddr, c.shoal.RouterAddr}
	revived := harness.StartShoalNode(t, harness.NodeOptions{
		Bin: shoalBin, Name: killedSite.name + "2", Containerd: killedSite.ctrd, BootstrapPeers: peers, Args: oneAtATime,
	})
	layoutDir := t.TempDir()
	harness.WriteOCILayoutDir(t, layoutDir, harness.RandomImage(t, 1, 1<<10), "docker.io/library/other:v1")
	verifier := harness.StartShoalNode(t, harness.NodeOptions{
		Bin: shoalBin, Name: "V", LayoutDir: layoutDir, BootstrapPeers: peers,
		Args: append([]string{"--verify-blobs"}, oneAtATime...),
	})
	holders = []*harness.ShoalNode{revived, otherSite.shoal}
	waitAdvertised(t, holders...)
	killMidTransfer(t, verifier, holders, "library/big", ld.String())
	if v := verifier.Metric(t, "shoal_node_resumed_transfers_total"); v < 1 {
		t.Errorf("shoal_node_resumed_transfers_total on the --verify-blobs node = %v, want >= 1", v)
	}

	// A whole ctr pull on B now completes from the surviving peer.
	pull(t, b, ref)
	requireContent(t, b, img)
	requireNoPanic(t, sites...)
	t.Logf("done in %s", time.Since(t0).Round(time.Millisecond))
}

// waitAdvertised waits until each node advertises at least the big image's
// manifest, config, layer and tag.
func waitAdvertised(t *testing.T, nodes ...*harness.ShoalNode) {
	t.Helper()
	eventually(t, 10*time.Second, "holders advertise the image", func() error {
		for _, n := range nodes {
			if v, err := n.MetricErr("shoal_node_advertised_keys"); err != nil || v < 4 {
				return fmt.Errorf("%s advertises %v keys (%v)", n.Name, v, err)
			}
		}
		return nil
	})
}

// killMidTransfer fetches the blob through relay, stops reading after 16
// MiB so that the serving holder's socket backs up, SIGKILLs that holder,
// then reads the rest and checks the whole body against the digest. It
// returns the node it killed.
func killMidTransfer(t *testing.T, relay *harness.ShoalNode, holders []*harness.ShoalNode, repo, dgst string) *harness.ShoalNode {
	t.Helper()
	return faultMidTransfer(t, relay, holders, repo, dgst, bigLayerSize, "killing", (*harness.ShoalNode).Kill)
}

// faultMidTransfer is killMidTransfer with another fault (and blob size):
// fault is applied to the serving holder once its socket backs up.
func faultMidTransfer(t *testing.T, relay *harness.ShoalNode, holders []*harness.ShoalNode, repo, dgst string, size int64,
	what string, fault func(*harness.ShoalNode)) *harness.ShoalNode {
	t.Helper()
	resp, err := http.Get(relay.URL() + "/v2/" + repo + "/blobs/" + dgst + "?ns=docker.io")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET blob on %s: %s", relay.Name, resp.Status)
	}
	if cl := resp.ContentLength; cl != size {
		t.Fatalf("Content-Length %d, want %d", cl, size)
	}
	h := sha256.New()
	if _, err := io.CopyN(h, resp.Body, 16<<20); err != nil {
		t.Fatalf("first 16 MiB: %v", err)
	}
	var serving *harness.ShoalNode
	eventually(t, 5*time.Second, "find the serving peer", func() error {
		for _, n := range holders {
			backed, err := sendQueued(n.PeerAddr)
			if err != nil {
				return err
			}
			if backed {
				serving = n
				return nil
			}
		}
		return fmt.Errorf("no holder has bytes queued to %s", relay.Name)
	})
	t.Logf("%s relays from %s; %s it", relay.Name, serving.Name, what)
	fault(serving)

	n, err := io.Copy(h, resp.Body)
	if err != nil {
		t.Fatalf("rest of the blob after %s the holder: %v (read %d more bytes)", what, err, n)
	}
	if got := "sha256:" + hex.EncodeToString(h.Sum(nil)); got != dgst {
		t.Fatalf("relayed blob hashes to %s, want %s", got, dgst)
	}
	return serving
}

// bigLayer returns an uncompressed OCI layer of exactly size bytes: a tar
// holding one file of random-looking bytes. Uncompressed keeps the test fast.
func bigLayer(t *testing.T, size int) v1.Layer {
	t.Helper()
	// A tar is a 512-byte header, the file (a multiple of 512 here) and two
	// zero blocks.
	fileSize := size - 512 - 1024
	var hdr bytes.Buffer
	tw := tar.NewWriter(&hdr)
	if err := tw.WriteHeader(&tar.Header{Name: "big.bin", Mode: 0o644, Size: int64(fileSize), Typeflag: tar.TypeReg}); err != nil {
		t.Fatal(err)
	}
	tw.Flush()
	data := make([]byte, size) // the trailing zero blocks are already there
	copy(data, hdr.Bytes())
	block := data[512 : 512+1<<20]
	if _, err := rand.Read(block); err != nil {
		t.Fatal(err)
	}
	for off := 512 + len(block); off < 512+fileSize; off += len(block) {
		copy(data[off:512+fileSize], block)
		data[off] ^= byte(off >> 20) // no two blocks alike
	}
	return static.NewLayer(data, types.OCIUncompressedLayer)
}

// sendQueued reports whether an established TCP connection served from addr
// (127.0.0.1:port) has unsent bytes queued: the server is mid-response to a
// reader that is not keeping up.
func sendQueued(addr string) (bool, error) {
	_, portStr, _ := strings.Cut(addr, ":")
	port, err := strconv.Atoi(portStr)
	if err != nil {
		return false, err
	}
	f, err := os.Open("/proc/net/tcp")
	if err != nil {
		return false, err
	}
	defer f.Close()
	local := fmt.Sprintf("0100007F:%04X", port)
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		// sl local_address rem_address st tx_queue:rx_queue ...
		if len(fields) < 5 || fields[1] != local || fields[3] != "01" {
			continue
		}
		txq, _, _ := strings.Cut(fields[4], ":")
		if q, err := strconv.ParseUint(txq, 16, 64); err == nil && q > 0 {
			return true, nil
		}
	}
	return false, sc.Err()
}

// A peer that stalls mid-transfer (SIGSTOP: its socket stays open, nothing
// more arrives) costs the pull one idle timeout: the relay resumes on the
// other holder, byte-identical, on the same response.
func TestPeerStoppedMidTransfer(t *testing.T) {
	bin := requireShoal(t)
	const size = 64 << 20
	layer := bigLayer(t, size)
	img := harness.ImageWithLayers(t, layer)
	holdersDir := t.TempDir()
	harness.WriteOCILayoutDir(t, holdersDir, img, "docker.io/library/big:v1")
	a := harness.StartShoalNode(t, harness.NodeOptions{Bin: bin, Name: "A", LayoutDir: holdersDir})
	c := harness.StartShoalNode(t, harness.NodeOptions{Bin: bin, Name: "C", LayoutDir: holdersDir, BootstrapPeers: []string{a.RouterAddr}})
	otherDir := t.TempDir()
	harness.WriteOCILayoutDir(t, otherDir, harness.RandomImage(t, 1, 1<<10), "docker.io/library/other:v1")
	b := harness.StartShoalNode(t, harness.NodeOptions{Bin: bin, Name: "B", LayoutDir: otherDir,
		// One peer at a time: this is the resume path. A striped fetch
		// moves a stalled holder's segments instead (stripe_test.go).
		BootstrapPeers: []string{a.RouterAddr, c.RouterAddr}, Args: []string{"--relay-idle-timeout", "1s", "--stripe-max-peers", "1"}})
	holders := []*harness.ShoalNode{a, c}
	waitAdvertised(t, holders...)
	ld, err := layer.Digest()
	if err != nil {
		t.Fatal(err)
	}
	stopped := faultMidTransfer(t, b, holders, "library/big", ld.String(), size, "stopping", func(n *harness.ShoalNode) {
		if err := syscall.Kill(n.PID(), syscall.SIGSTOP); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = syscall.Kill(n.PID(), syscall.SIGCONT) })
	})
	if v := b.Metric(t, "shoal_node_resumed_transfers_total"); v < 1 {
		t.Errorf("shoal_node_resumed_transfers_total on B = %v, want >= 1", v)
	}
	t.Logf("%s stalled; the transfer resumed elsewhere", stopped.Name)
}

// containerd 2.4's chunked layer fetch (max_concurrent_downloads 4,
// concurrent_layer_fetch_buffer 4 MiB) pulls a one-layer 48 MiB image
// through its node from two holders: every open-ended Range chunk is a 206,
// containerd closing each chunk's body blames no holder, the chunks spread
// over both holders, and the pull completes byte-identical. Its retries
// would otherwise meet cooled-down holders and an unresolvable tag.
func TestContainerdChunkedFetchThroughShoal(t *testing.T) {
	bin := requireShoal(t)
	const size = 48 << 20
	layer := bigLayer(t, size)
	img := harness.ImageWithLayers(t, layer)
	const ref = "docker.io/library/chunked:v1"
	sites := startSites(t, harness.ContainerdV2, harness.ContainerdV2)
	a, c := sites[0], sites[1]
	tarPath := harness.WriteOCILayoutTar(t, img, ref)
	a.ctrd.Import(t, tarPath)
	c.ctrd.Import(t, tarPath)
	waitAdvertised(t, a.shoal, c.shoal)

	bctrd := harness.StartContainerdChunked(t, 4, 4<<20)
	bnode := harness.StartShoalNode(t, harness.NodeOptions{Bin: bin, Name: "B", Containerd: bctrd,
		BootstrapPeers: []string{a.shoal.RouterAddr, c.shoal.RouterAddr}})
	b := &site{name: "B", ctrd: bctrd, shoal: bnode}
	configureMirror(t, bin, b)
	waitMesh(t, []*site{a, b, c})

	pull(t, b, ref)
	requireContent(t, b, img)
	// containerd fetched in chunks and closed each one: proof the chunked
	// fetch ran, and that those closes were not taken for broken peers.
	if v := bnode.Metric(t, "shoal_node_client_closed_transfers_total"); v < 1 {
		t.Errorf("B saw %v chunk closes: containerd's chunked fetch did not run", v)
	}
	if v := bnode.Metric(t, "shoal_node_peer_errors_total"); v != 0 {
		t.Errorf("B counted %v peer errors: containerd closing its chunks blamed a holder", v)
	}
	for _, s := range []*site{a, c} {
		if v := s.shoal.Metric(t, "shoal_node_served_bytes_total", `source="local"`); v < 4<<20 {
			t.Errorf("holder %s served %v bytes; the chunks did not spread over both holders", s.name, v)
		}
	}
	requireNoPanic(t, a, b, c)
}
