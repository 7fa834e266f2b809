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
// resumes on the other peer that holds it (Range), and the bytes match.
// A ctr pull on B afterwards completes from the surviving peer.
func TestPeerKilledMidTransfer(t *testing.T) {
	sites := startSites(t, harness.ContainerdV2, harness.ContainerdV2, harness.ContainerdV2)
	a, b, c := sites[0], sites[1], sites[2]

	t0 := time.Now()
	layer := bigLayer(t, bigLayerSize)
	t.Logf("layer made %s", time.Since(t0))
	img := harness.ImageWithLayers(t, layer)
	const ref = "docker.io/library/big:v1"
	tarPath := harness.WriteOCILayoutTar(t, img, ref)
	t.Logf("layout written %s", time.Since(t0))
	a.ctrd.Import(t, tarPath)
	c.ctrd.Import(t, tarPath)
	t.Logf("imported %s", time.Since(t0))
	ld, err := layer.Digest()
	if err != nil {
		t.Fatal(err)
	}
	// Both holders have advertised manifest, config, layer and tag.
	eventually(t, 10*time.Second, "A and C advertise the image", func() error {
		for _, s := range []*site{a, c} {
			if v, err := s.shoal.MetricErr("shoal_node_advertised_keys"); err != nil || v < 4 {
				return fmt.Errorf("%s advertises %v keys (%v)", s.name, v, err)
			}
		}
		return nil
	})

	// Fetch the blob through B and stop reading after 16 MiB, so the
	// serving peer's socket backs up and is easy to spot.
	resp, err := http.Get(b.shoal.URL() + "/v2/library/big/blobs/" + ld.String() + "?ns=docker.io")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET blob on B: %s", resp.Status)
	}
	if cl := resp.ContentLength; cl != bigLayerSize {
		t.Fatalf("Content-Length %d, want %d", cl, bigLayerSize)
	}
	h := sha256.New()
	if _, err := io.CopyN(h, resp.Body, 16<<20); err != nil {
		t.Fatalf("first 16 MiB: %v", err)
	}
	var serving *site
	eventually(t, 5*time.Second, "find the serving peer", func() error {
		for _, s := range []*site{a, c} {
			backed, err := sendQueued(s.shoal.RegistryAddr)
			if err != nil {
				return err
			}
			if backed {
				serving = s
				return nil
			}
		}
		return fmt.Errorf("no peer has bytes queued to B")
	})
	t.Logf("peer %s is serving; killing it", serving.name)
	serving.shoal.Kill()

	n, err := io.Copy(h, resp.Body)
	if err != nil {
		t.Fatalf("rest of the blob after the kill: %v (read %d more bytes)", err, n)
	}
	if got := "sha256:" + hex.EncodeToString(h.Sum(nil)); got != ld.String() {
		t.Fatalf("relayed blob hashes to %s, want %s", got, ld)
	}
	if v := b.shoal.Metric(t, "shoal_node_resumed_transfers_total"); v < 1 {
		t.Errorf("shoal_node_resumed_transfers_total on B = %v, want >= 1", v)
	}

	t.Logf("relayed %s", time.Since(t0))
	// A whole ctr pull on B now completes from the surviving peer.
	pull(t, b, ref)
	t.Logf("pulled %s", time.Since(t0))
	requireContent(t, b, img)
	requireNoPanic(t, sites...)
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
