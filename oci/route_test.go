package oci

import (
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
)

const hexA = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"

func TestParsePath(t *testing.T) {
	tests := []struct {
		name, path, query string
		want              Route
		status            int
		code              ErrorCode
	}{
		{name: "base", path: "/v2/", want: Route{Kind: KindBase, Registry: "docker.io"}},
		{name: "base without slash", path: "/v2", want: Route{Kind: KindBase, Registry: "docker.io"}},
		{name: "manifest by tag defaults to docker.io", path: "/v2/library/alpine/manifests/3.20",
			want: Route{Kind: KindManifest, Registry: "docker.io", Name: "library/alpine", Tag: "3.20"}},
		{name: "ns selects the registry", path: "/v2/org/app/manifests/v1", query: "ns=ghcr.io",
			want: Route{Kind: KindManifest, Registry: "ghcr.io", NS: true, Name: "org/app", Tag: "v1"}},
		{name: "docker hub alias maps to docker.io", path: "/v2/x/manifests/v1", query: "ns=registry-1.docker.io",
			want: Route{Kind: KindManifest, Registry: "docker.io", NS: true, Name: "x", Tag: "v1"}},
		{name: "ns with port", path: "/v2/x/manifests/v1", query: "ns=127.0.0.1:5000",
			want: Route{Kind: KindManifest, Registry: "127.0.0.1:5000", NS: true, Name: "x", Tag: "v1"}},
		{name: "manifest by digest", path: "/v2/a/b/c/manifests/sha256:" + hexA,
			want: Route{Kind: KindManifest, Registry: "docker.io", Name: "a/b/c", Digest: "sha256:" + hexA}},
		{name: "blob", path: "/v2/a/blobs/sha256:" + hexA,
			want: Route{Kind: KindBlob, Registry: "docker.io", Name: "a", Digest: "sha256:" + hexA}},
		{name: "repo named blobs", path: "/v2/blobs/blobs/sha256:" + hexA,
			want: Route{Kind: KindBlob, Registry: "docker.io", Name: "blobs", Digest: "sha256:" + hexA}},
		{name: "malformed digest", path: "/v2/a/blobs/sha256:zzz", status: 400, code: CodeDigestInvalid},
		{name: "short digest", path: "/v2/a/blobs/sha256:abc", status: 400, code: CodeDigestInvalid},
		{name: "unknown algorithm", path: "/v2/a/blobs/md5:" + hexA[:32], status: 400, code: CodeDigestInvalid},
		{name: "blob by tag", path: "/v2/a/blobs/latest", status: 400, code: CodeDigestInvalid},
		{name: "dot dot segment", path: "/v2/a/../b/manifests/v1", status: 400, code: CodeNameInvalid},
		{name: "escaped dot dot", path: "/v2/a/%2e%2e/b/manifests/v1", status: 400, code: CodeNameInvalid},
		{name: "uppercase name", path: "/v2/Alpine/manifests/v1", status: 400, code: CodeNameInvalid},
		{name: "empty segment", path: "/v2/a//b/manifests/v1", status: 400, code: CodeNameInvalid},
		{name: "name too long", path: "/v2/" + strings.Repeat("a", 256) + "/manifests/v1", status: 400, code: CodeNameInvalid},
		{name: "tag too long", path: "/v2/a/manifests/" + strings.Repeat("t", 129), status: 400, code: CodeManifestInvalid},
		{name: "bad tag", path: "/v2/a/manifests/-x", status: 400, code: CodeManifestInvalid},
		{name: "huge ns", path: "/v2/a/manifests/v1", query: "ns=" + strings.Repeat("a", 300), status: 400, code: CodeNameInvalid},
		{name: "ns with path", path: "/v2/a/manifests/v1", query: "ns=evil.com%2Fx", status: 400, code: CodeNameInvalid},
		{name: "two ns", path: "/v2/a/manifests/v1", query: "ns=a.io&ns=b.io", status: 400, code: CodeNameInvalid},
		{name: "huge path", path: "/v2/" + strings.Repeat("a/", 2000) + "manifests/v1", status: 414, code: CodeNameInvalid},
		{name: "unknown route", path: "/v2/a/tags/list", status: 404, code: CodeNameUnknown},
		{name: "outside v2", path: "/etc/passwd", status: 404, code: CodeNameUnknown},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ParsePath(tt.path, tt.query)
			if tt.status != 0 {
				oe, ok := err.(*Error)
				if !ok {
					t.Fatalf("want *Error %d, got %v (route %+v)", tt.status, err, got)
				}
				if oe.Status != tt.status || oe.Code != tt.code {
					t.Fatalf("got %d %s, want %d %s", oe.Status, oe.Code, tt.status, tt.code)
				}
				return
			}
			if err != nil {
				t.Fatalf("unexpected error: %v", err)
			}
			if got != tt.want {
				t.Fatalf("got %+v, want %+v", got, tt.want)
			}
		})
	}
}

func TestParseRouteRejectsWrites(t *testing.T) {
	for _, m := range []string{"PUT", "POST", "DELETE", "PATCH", "BREW"} {
		r := httptest.NewRequest(m, "/v2/a/manifests/v1", nil)
		_, err := ParseRoute(r)
		oe, ok := err.(*Error)
		if !ok || oe.Status != http.StatusMethodNotAllowed || oe.Code != CodeUnsupported {
			t.Errorf("%s: got %v, want 405 UNSUPPORTED", m, err)
		}
	}
}

func TestRouteReference(t *testing.T) {
	r := Route{Registry: "docker.io", Name: "library/alpine", Tag: "3"}
	if got := r.Reference(); got != "docker.io/library/alpine:3" {
		t.Fatalf("got %q", got)
	}
	r = Route{Registry: "ghcr.io", Name: "a", Digest: "sha256:" + hexA}
	if got := r.Reference(); got != "ghcr.io/a@sha256:"+hexA {
		t.Fatalf("got %q", got)
	}
}
