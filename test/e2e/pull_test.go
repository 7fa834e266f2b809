package e2e

import (
	"fmt"
	"net/http"
	"testing"
	"time"

	"github.com/shoal-oci/shoal/test/harness"
)

// (a) An image imported into containerd A only is pulled by containerd B
// through B's mirror, byte-identical, with upstream dead.
func TestPullFromPeer(t *testing.T) {
	sites := startSites(t, harness.ContainerdV2, harness.ContainerdV2, harness.ContainerdV2)
	a, b := sites[0], sites[1]
	img := harness.RandomImage(t, 3, 64<<10)
	const ref = "docker.io/library/pullfrompeer:v1"
	importImage(t, a.ctrd, img, ref)
	m, _, _ := imageDigests(t, img)

	// Wait until A's tag is findable from B, then pull with ctr.
	eventually(t, 10*time.Second, "tag resolvable from B", func() error {
		return headManifest(b, "library/pullfrompeer", "v1", m.String())
	})
	pull(t, b, ref)
	requireContent(t, b, img)
	if got := b.shoal.Metric(t, "shoal_node_requests_total", `source="peer"`); got == 0 {
		t.Errorf("B served nothing from a peer")
	}
	// A counts each request after its body is written, so poll.
	eventually(t, 5*time.Second, "A counts the blobs it served", func() error {
		if got := a.shoal.Metric(t, "shoal_node_requests_total", `source="local"`, `kind="blob"`); got < 4 {
			return fmt.Errorf("A served %v blobs locally, want at least 4 (config and 3 layers)", got)
		}
		return nil
	})
	requireNoPanic(t, sites...)
}

// The containerd 1.7 compatibility path: A runs containerd 1.7, B (2.x)
// pulls A's images through its mirror. containerd 1.7 publishes image events
// for the images service (what CRI uses) but not for its transfer service,
// so the first image (imported through the images service) is found through
// events and the second (through the transfer service) by the store's poll.
func TestPullFromContainerd17Peer(t *testing.T) {
	sites := startSites(t, harness.ContainerdV17, harness.ContainerdV2)
	a, b := sites[0], sites[1]

	evImg := harness.RandomImage(t, 2, 32<<10)
	const evRef = "docker.io/library/compat17:events"
	a.ctrd.Ctr(t, "images", "import", "--local", "--no-unpack", harness.WriteOCILayoutTar(t, evImg, evRef))
	m, _, _ := imageDigests(t, evImg)
	eventually(t, 5*time.Second, "event-driven tag on the 1.7 node resolvable from B", func() error {
		return headManifest(b, "library/compat17", "events", m.String())
	})
	pull(t, b, evRef)
	requireContent(t, b, evImg)

	pollImg := harness.RandomImage(t, 1, 32<<10)
	const pollRef = "docker.io/library/compat17:poll"
	importImage(t, a.ctrd, pollImg, pollRef)
	m, _, _ = imageDigests(t, pollImg)
	eventually(t, 15*time.Second, "polled tag on the 1.7 node resolvable from B", func() error {
		return headManifest(b, "library/compat17", "poll", m.String())
	})
	pull(t, b, pollRef)
	requireContent(t, b, pollImg)

	if got := a.shoal.Metric(t, "shoal_node_requests_total", `source="local"`); got == 0 {
		t.Errorf("the 1.7 node served nothing")
	}
	requireNoPanic(t, sites...)
}

// headManifest asks the site's node for repo:tag as containerd does and
// checks the answer's digest.
func headManifest(s *site, repo, tag, want string) error {
	resp, _, err := requestErr(http.MethodHead, s.shoal.URL()+"/v2/"+repo+"/manifests/"+tag+"?ns=docker.io",
		"Accept", "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.v2+json")
	if err != nil {
		return err
	}
	if resp.StatusCode != http.StatusOK {
		return &statusError{resp.StatusCode}
	}
	if got := resp.Header.Get("Docker-Content-Digest"); got != want {
		return &digestError{got: got, want: want}
	}
	return nil
}

type statusError struct{ code int }

func (e *statusError) Error() string { return "status " + http.StatusText(e.code) }

type digestError struct{ got, want string }

func (e *digestError) Error() string { return "digest " + e.got + ", want " + e.want }
