package cache_e2e

import (
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/opencontainers/go-digest"

	"github.com/shoal-oci/shoal/test/harness"
	"github.com/shoal-oci/shoal/test/hub"
)

// TestBadInputGetsOCIErrors: an unknown ns, malformed references and a Range
// past the end each get the right status and an OCI error envelope.
func TestBadInputGetsOCIErrors(t *testing.T) {
	h := hub.Start(t)
	img := harness.RandomImage(t, 1, 4096)
	h.Push(t, "library/app", "v1", img)
	layers, _ := img.Layers()
	lh, _ := layers[0].Digest()
	cfg, _ := img.ConfigName()
	c := startCache(t, h, cacheOpts{})
	// Cache the layer; the config stays uncached (the Range check on a blob in flight).
	if resp, _ := do(t, "GET", nsURL(c.url(), "/v2/library/app/blobs/"+lh.String(), h.Host())); resp.StatusCode != 200 {
		t.Fatalf("warm-up: %d", resp.StatusCode)
	}
	ns := "ns=" + h.Host()
	for _, tc := range []struct {
		name, method, path string
		hdr                []string
		status             int
		code               string
	}{
		{"unknown ns", "GET", "/v2/library/app/manifests/v1?ns=unknown.example.com", nil, 404, "NAME_UNKNOWN"},
		{"unknown ns on a blob", "GET", "/v2/library/app/blobs/" + lh.String() + "?ns=quay.io", nil, 404, "NAME_UNKNOWN"},
		{"malformed digest", "GET", "/v2/library/app/blobs/sha256:abc?" + ns, nil, 400, "DIGEST_INVALID"},
		{"malformed manifest digest", "GET", "/v2/library/app/manifests/sha256:zz?" + ns, nil, 400, ""},
		{"unknown algorithm", "GET", "/v2/library/app/blobs/md5:d41d8cd98f00b204e9800998ecf8427e?" + ns, nil, 400, ""},
		{"upper-case name", "GET", "/v2/Library/App/manifests/v1?" + ns, nil, 400, "NAME_INVALID"},
		{"bad tag", "GET", "/v2/library/app/manifests/-v1?" + ns, nil, 400, ""},
		{"tag too long", "GET", "/v2/library/app/manifests/" + strings.Repeat("t", 200) + "?" + ns, nil, 400, ""},
		{"name with ..", "GET", "/v2/library/../app/manifests/v1?" + ns, nil, 400, ""},
		{"unknown tag", "GET", "/v2/library/app/manifests/nope?" + ns, nil, 404, "MANIFEST_UNKNOWN"},
		{"unknown blob", "GET", "/v2/library/app/blobs/" + digest.FromString("nope").String() + "?" + ns, nil, 404, "BLOB_UNKNOWN"},
		{"push refused", "PUT", "/v2/library/app/manifests/v1?" + ns, nil, 405, "UNSUPPORTED"},
		{"range past the end, cached", "GET", "/v2/library/app/blobs/" + lh.String() + "?" + ns, []string{"Range", "bytes=99999999-"}, 416, "RANGE_INVALID"},
		{"range past the end, uncached", "GET", "/v2/library/app/blobs/" + cfg.String() + "?" + ns, []string{"Range", "bytes=99999999-100000000"}, 416, "RANGE_INVALID"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			resp, body := do(t, tc.method, c.url()+tc.path, tc.hdr...)
			e, ok := parseOCIError(body)
			if resp.StatusCode != tc.status || !ok || (tc.code != "" && e.Code != tc.code) {
				t.Fatalf("%s %s: %d %s, want %d %s", tc.method, tc.path, resp.StatusCode, body, tc.status, tc.code)
			}
			if ct := resp.Header.Get("Content-Type"); !strings.HasPrefix(ct, "application/json") {
				t.Fatalf("error content type %q", ct)
			}
			if e.Message == "" {
				t.Fatalf("error without a message: %s", body)
			}
		})
	}
	if n := h.Counts().ManifestGET; n != 0 {
		t.Fatalf("bad input cost %d counted upstream GETs", n)
	}
}

// TestClientTokenRequired: with --client-token-file the cache answers 401
// UNAUTHORIZED without the token, and a node with --cache-token-file pulls
// through it.
func TestClientTokenRequired(t *testing.T) {
	h := hub.Start(t)
	img := harness.RandomImage(t, 1, 4096)
	h.Push(t, "library/app", "v1", img)
	want := imageContent(t, img)
	dir := t.TempDir()
	tokenFile := filepath.Join(dir, "token")
	const token = "node-token-8f3a1c"
	if err := os.WriteFile(tokenFile, []byte(token+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	c := startCache(t, h, cacheOpts{args: []string{"--client-token-file", tokenFile}})

	for _, hdr := range [][]string{nil, {"Authorization", "Bearer wrong"}, {"Authorization", "Basic " + token}} {
		for _, p := range []string{"/v2/", "/v2/library/app/manifests/v1"} {
			resp, body := do(t, "GET", nsURL(c.url(), p, h.Host()), hdr...)
			e, ok := parseOCIError(body)
			if resp.StatusCode != http.StatusUnauthorized || !ok || e.Code != "UNAUTHORIZED" {
				t.Fatalf("GET %s with %v: %d %s, want 401 UNAUTHORIZED", p, hdr, resp.StatusCode, body)
			}
			if strings.Contains(string(body), token) {
				t.Fatal("the 401 quotes the token")
			}
		}
	}
	if n := h.Counts().Requests; n != 0 {
		t.Fatalf("unauthenticated requests reached upstream: %+v", h.Counts())
	}
	if resp, _ := do(t, "GET", nsURL(c.url(), "/v2/", h.Host()), "Authorization", "Bearer "+token); resp.StatusCode != 200 {
		t.Fatalf("with the token: %d", resp.StatusCode)
	}
	// Probes stay open.
	if resp, _ := do(t, "GET", c.url()+"/readyz"); resp.StatusCode != 200 {
		t.Fatalf("/readyz behind the token: %d", resp.StatusCode)
	}

	node := harness.StartShoalNode(t, harness.NodeOptions{
		Bin: requireShoal(t), Name: "with-token", LayoutDir: emptyLayout(t), NoRouter: true,
		Registries: []string{h.Host()}, Args: []string{"--cache-url", c.url(), "--cache-token-file", tokenFile},
	})
	got, err := ggcrPull(t.Context(), node.RegistryAddr, "library/app", "v1", h.Host())
	if err != nil {
		t.Fatalf("pull through a node with the token: %v", err)
	}
	if err := want.same(got); err != nil {
		t.Fatal(err)
	}
	if strings.Contains(node.Log(), token) || strings.Contains(c.log(), token) {
		t.Fatal("the client token appears in a log")
	}

	// A node without the token gets nothing from the cache.
	bare := harness.StartShoalNode(t, harness.NodeOptions{
		Bin: requireShoal(t), Name: "no-token", LayoutDir: emptyLayout(t), NoRouter: true,
		Registries: []string{h.Host()}, Args: []string{"--cache-url", c.url()},
	})
	if resp, body := do(t, "GET", nsURL(bare.URL(), "/v2/library/app/manifests/v1", h.Host())); resp.StatusCode == 200 {
		t.Fatalf("a node without the token got the manifest: %s", body)
	}
}
