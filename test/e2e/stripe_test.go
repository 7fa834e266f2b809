package e2e

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"net/http"
	"testing"
	"time"

	"github.com/shoal-oci/shoal/test/harness"
)

// A large blob that three nodes hold is fetched by a fourth from all three
// at once (striped), and one holder is SIGKILLed mid-transfer: its share
// moves to the other two, and the blob arrives byte-identical. The nodes
// are real processes serving OCI layouts.
func TestStripedFetchSurvivesKilledHolder(t *testing.T) {
	bin := requireShoal(t)
	const size = 96 << 20
	layer := bigLayer(t, size)
	img := harness.ImageWithLayers(t, layer)
	ld, err := layer.Digest()
	if err != nil {
		t.Fatal(err)
	}
	var holders []*harness.ShoalNode
	var routers []string
	for i := range 3 {
		dir := t.TempDir()
		harness.WriteOCILayoutDir(t, dir, img, "docker.io/library/striped:v1")
		n := harness.StartShoalNode(t, harness.NodeOptions{
			Bin: bin, Name: fmt.Sprintf("H%d", i), LayoutDir: dir, BootstrapPeers: routers,
		})
		holders = append(holders, n)
		routers = append(routers, n.RouterAddr)
	}
	empty := t.TempDir()
	harness.WriteOCILayoutDir(t, empty, harness.RandomImage(t, 1, 1<<10), "docker.io/library/other:v1")
	req := harness.StartShoalNode(t, harness.NodeOptions{
		Bin: bin, Name: "R", LayoutDir: empty, BootstrapPeers: routers,
		Args: []string{"--stripe-min-size", "16MiB"},
	})
	url := req.URL() + "/v2/library/striped/blobs/" + ld.String() + "?ns=docker.io"
	eventually(t, 15*time.Second, "R finds the blob and the holders advertise it", func() error {
		resp, _, err := requestErr(http.MethodHead, url)
		if err != nil {
			return err
		}
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("HEAD on R: %s", resp.Status)
		}
		for _, h := range holders {
			if v, err := h.MetricErr("shoal_node_advertised_keys"); err != nil || v < 4 {
				return fmt.Errorf("%s advertises %v keys (%v)", h.Name, v, err)
			}
		}
		return nil
	})

	// Undisturbed fetches, until R knows every holder (its first lookup
	// may answer with the first holder the DHT found): then all three
	// serve part of one fetch.
	eventually(t, 30*time.Second, "one striped fetch draws on all three holders", func() error {
		before := make([]float64, len(holders))
		for i, h := range holders {
			before[i] = h.Metric(t, "shoal_node_served_bytes_total", `source="local"`)
		}
		fetchAndCheck(t, url, ld.String(), size, 0, nil)
		for i, h := range holders {
			if got := h.Metric(t, "shoal_node_served_bytes_total", `source="local"`) - before[i]; got <= 0 {
				return fmt.Errorf("%s served nothing of a striped fetch", h.Name)
			}
		}
		return nil
	})
	if v := req.Metric(t, "shoal_node_striped_transfers_total"); v < 1 {
		t.Fatalf("shoal_node_striped_transfers_total on R = %v, want >= 1", v)
	}

	// Then a fetch whose reader stalls after 16 MiB, while H1 is killed.
	fetchAndCheck(t, url, ld.String(), size, 16<<20, func() {
		t.Logf("killing %s mid-transfer", holders[1].Name)
		holders[1].Kill()
	})
	if v := req.Metric(t, "shoal_node_aborted_transfers_total"); v != 0 {
		t.Errorf("R aborted %v transfers", v)
	}
	requireNoPanicNodes(t, append(holders, req)...)
}

// fetchAndCheck GETs url, checks Content-Length, reads pause bytes, runs
// fault (if any), reads the rest and checks the digest.
func fetchAndCheck(t *testing.T, url, dgst string, size, pause int64, fault func()) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK || resp.ContentLength != size {
		t.Fatalf("GET: %s, Content-Length %d (want 200, %d)", resp.Status, resp.ContentLength, size)
	}
	h := sha256.New()
	if pause > 0 {
		if _, err := io.CopyN(h, resp.Body, pause); err != nil {
			t.Fatalf("first %d bytes: %v", pause, err)
		}
	}
	if fault != nil {
		fault()
	}
	if n, err := io.Copy(h, resp.Body); err != nil {
		t.Fatalf("rest of the blob: %v (read %d more bytes)", err, n)
	}
	if got := "sha256:" + hex.EncodeToString(h.Sum(nil)); got != dgst {
		t.Fatalf("blob hashes to %s, want %s", got, dgst)
	}
}
