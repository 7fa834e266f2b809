package e2e

import (
	"net/http"
	"testing"

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
	eventually(t, 10e9, "tag resolvable from B", func() error {
		return headManifest(b, "library/pullfrompeer", "v1", m.String())
	})
	pull(t, b, ref)
	requireContent(t, b, img)
	if got := b.shoal.Metric(t, "shoal_node_requests_total", `source="peer"`); got == 0 {
		t.Errorf("B served nothing from a peer")
	}
	if got := a.shoal.Metric(t, "shoal_node_requests_total", `source="local"`, `kind="blob"`); got < 4 {
		t.Errorf("A served %v blobs locally, want at least 4 (config and 3 layers)", got)
	}
	requireNoPanic(t, sites...)
}

// The containerd 1.7 compatibility path: A runs containerd 1.7, B (2.x)
// pulls A's image through its mirror.
func TestPullFromContainerd17Peer(t *testing.T) {
	sites := startSites(t, harness.ContainerdV17, harness.ContainerdV2)
	a, b := sites[0], sites[1]
	img := harness.RandomImage(t, 2, 32<<10)
	const ref = "docker.io/library/compat17:v1"
	importImage(t, a.ctrd, img, ref)
	m, _, _ := imageDigests(t, img)
	eventually(t, 10e9, "tag on the 1.7 node resolvable from B", func() error {
		return headManifest(b, "library/compat17", "v1", m.String())
	})
	pull(t, b, ref)
	requireContent(t, b, img)
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
