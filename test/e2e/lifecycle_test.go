package e2e

import (
	"fmt"
	"net/http"
	"testing"
	"time"

	"github.com/shoal-oci/shoal/test/harness"
)

// (c) A tag pulled on A after every node started is advertised and
// resolvable from B. The image reaches A by a real pull (from C, through A's
// mirror); then C leaves, so only A can answer B.
func TestTagPulledAfterStartIsResolvable(t *testing.T) {
	sites := startSites(t, harness.ContainerdV2, harness.ContainerdV2, harness.ContainerdV2)
	a, b, c := sites[0], sites[1], sites[2]
	img := harness.RandomImage(t, 2, 32<<10)
	m, _, _ := imageDigests(t, img)
	const repo, tag = "library/latecomer", "v2"
	const ref = "docker.io/" + repo + ":" + tag

	importImage(t, c.ctrd, img, ref)
	eventually(t, 10*time.Second, "A resolves C's tag", func() error { return headManifest(a, repo, tag, m.String()) })
	pull(t, a, ref)
	requireContent(t, a, img)
	c.shoal.Stop()

	before := a.shoal.Metric(t, "shoal_node_requests_total", `source="local"`)
	eventually(t, 10*time.Second, "B resolves the tag A pulled", func() error {
		return headManifest(b, repo, tag, m.String())
	})
	resp, _ := request(t, http.MethodGet, b.shoal.URL()+"/v2/"+repo+"/manifests/"+tag+"?ns=docker.io")
	if resp.StatusCode != http.StatusOK || resp.Header.Get("Docker-Content-Digest") != m.String() {
		t.Fatalf("GET tag on B: %s, digest %q, want 200 %s", resp.Status, resp.Header.Get("Docker-Content-Digest"), m)
	}
	pull(t, b, ref)
	requireContent(t, b, img)
	if after := a.shoal.Metric(t, "shoal_node_requests_total", `source="local"`); after <= before {
		t.Errorf("A served nothing locally for B's pull (%v -> %v)", before, after)
	}
	requireNoPanic(t, a, b)
}

// (d) An image deleted on A is withdrawn: its tag and the digests no other
// image on A references stop being routed to A within a few provider TTLs,
// while a layer another image on A still uses keeps being served.
func TestDeletedImageIsWithdrawn(t *testing.T) {
	sites := startSites(t, harness.ContainerdV2, harness.ContainerdV2, harness.ContainerdV2)
	a, b := sites[0], sites[1]
	shared := harness.RandomLayer(t, 16<<10)
	gone := harness.ImageWithLayers(t, harness.RandomLayer(t, 16<<10), shared)
	kept := harness.ImageWithLayers(t, harness.RandomLayer(t, 16<<10), shared)
	const goneRepo, keptRepo = "library/gone", "library/kept"
	importImage(t, a.ctrd, gone, "docker.io/"+goneRepo+":v1")
	importImage(t, a.ctrd, kept, "docker.io/"+keptRepo+":v1")
	gm, gc, gl := imageDigests(t, gone)
	sharedDigest, err := shared.Digest()
	if err != nil {
		t.Fatal(err)
	}
	onlyGone := gl[0]

	// Every URL that must stop reaching A, and the one that must not.
	goneURLs := []string{
		b.shoal.URL() + "/v2/" + goneRepo + "/manifests/v1?ns=docker.io",
		b.shoal.URL() + "/v2/" + goneRepo + "/manifests/" + gm.String() + "?ns=docker.io",
		b.shoal.URL() + "/v2/" + goneRepo + "/blobs/" + gc.String() + "?ns=docker.io",
		b.shoal.URL() + "/v2/" + goneRepo + "/blobs/" + onlyGone.String() + "?ns=docker.io",
	}
	sharedURL := b.shoal.URL() + "/v2/" + keptRepo + "/blobs/" + sharedDigest.String() + "?ns=docker.io"

	// Before the delete, B gets all of it from A.
	eventually(t, 10*time.Second, "B gets the image from A", func() error {
		for _, u := range append(goneURLs, sharedURL) {
			resp, _, err := requestErr(http.MethodGet, u)
			if err != nil {
				return err
			}
			if resp.StatusCode != http.StatusOK {
				return fmt.Errorf("GET %s: %s", u, resp.Status)
			}
		}
		return nil
	})

	a.ctrd.Ctr(t, "images", "rm", "--sync", "docker.io/"+goneRepo+":v1")
	deleted := time.Now()

	// Within a few TTLs (3s), B answers 404 for everything only the deleted
	// image used, without asking A at all.
	eventually(t, 12*time.Second, "withdrawal reaches B", func() error {
		before := a.shoal.Metric(t, "shoal_node_requests_total")
		for _, u := range goneURLs {
			resp, _, err := requestErr(http.MethodGet, u)
			if err != nil {
				return err
			}
			if resp.StatusCode != http.StatusNotFound {
				return fmt.Errorf("GET %s: %s, want 404", u, resp.Status)
			}
		}
		if after := a.shoal.Metric(t, "shoal_node_requests_total"); after != before {
			return fmt.Errorf("B still routes to A (%v requests on A)", after-before)
		}
		return nil
	})
	t.Logf("withdrawn from B's view %s after the delete", time.Since(deleted).Round(100*time.Millisecond))

	// The shared layer is still on A and still served to B, by A.
	before := a.shoal.Metric(t, "shoal_node_requests_total", `source="local"`)
	resp, _ := request(t, http.MethodGet, sharedURL)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("shared layer on B after the delete: %s", resp.Status)
	}
	// A counts the request after its body is written, so the count may
	// trail B's response by a moment.
	eventually(t, 5*time.Second, "A counts serving the shared layer", func() error {
		if after := a.shoal.Metric(t, "shoal_node_requests_total", `source="local"`); after != before+1 {
			return fmt.Errorf("A served the shared layer %v times, want 1", after-before)
		}
		return nil
	})
	// And the kept image's tag still resolves.
	km, _, _ := imageDigests(t, kept)
	if err := headManifest(b, keptRepo, "v1", km.String()); err != nil {
		t.Errorf("kept tag on B: %v", err)
	}
	requireNoPanic(t, sites...)
}

// (e) containerd A restarts: shoal node A stays up, resubscribes, and a tag
// imported after the restart is advertised and pulled by B.
func TestContainerdRestartRecovers(t *testing.T) {
	sites := startSites(t, harness.ContainerdV2, harness.ContainerdV2, harness.ContainerdV2)
	a, b := sites[0], sites[1]
	before := harness.RandomImage(t, 1, 16<<10)
	importImage(t, a.ctrd, before, "docker.io/library/before:v1")
	bm, _, _ := imageDigests(t, before)
	eventually(t, 10*time.Second, "B resolves the image imported before the restart", func() error {
		return headManifest(b, "library/before", "v1", bm.String())
	})

	a.ctrd.Restart(t)
	// Node A notices (its event stream breaks and it subscribes again),
	// and stays up.
	eventually(t, 15*time.Second, "A resubscribes to the restarted containerd", func() error {
		if !a.shoal.Alive() {
			return nil // reported below
		}
		if v, err := a.shoal.MetricErr("shoal_store_resubscribes_total"); err != nil || v < 1 {
			return fmt.Errorf("resubscribes %v (%v)", v, err)
		}
		return nil
	})
	if !a.shoal.Alive() {
		t.Fatalf("shoal node A exited when containerd restarted: %v", a.shoal.ExitErr())
	}

	after := harness.RandomImage(t, 2, 16<<10)
	importImage(t, a.ctrd, after, "docker.io/library/after:v1")
	am, _, _ := imageDigests(t, after)
	eventually(t, 15*time.Second, "B resolves the image imported after the restart", func() error {
		return headManifest(b, "library/after", "v1", am.String())
	})
	pull(t, b, "docker.io/library/after:v1")
	requireContent(t, b, after)
	// The image from before the restart is still served too.
	pull(t, b, "docker.io/library/before:v1")
	requireContent(t, b, before)

	if !a.shoal.Alive() {
		t.Fatalf("shoal node A exited: %v", a.shoal.ExitErr())
	}
	if v := a.shoal.Metric(t, "shoal_store_resubscribes_total"); v < 1 {
		t.Errorf("shoal_store_resubscribes_total on A = %v, want >= 1", v)
	}
	resp, _ := request(t, http.MethodGet, "http://"+a.shoal.MetricsAddr+"/readyz")
	if resp.StatusCode != http.StatusOK {
		t.Errorf("A /readyz after the restart: %s", resp.Status)
	}
	requireNoPanic(t, sites...)
}
