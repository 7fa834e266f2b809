package oci

import (
	"errors"
	"strings"
	"testing"
)

// FuzzParsePath: any path and query either parse into a route that
// round-trips through the grammar, or fail with an *Error carrying a 4xx
// status. Never a panic.
func FuzzParsePath(f *testing.F) {
	for _, s := range []string{"/v2/", "/v2/library/alpine/manifests/3.20", "/v2/a/blobs/sha256:" + hexA,
		"/v2/a/../b/manifests/v1", "/v2/%2e%2e/manifests/x", "/v2//blobs/", "/v2/a/manifests/sha256:zz"} {
		f.Add(s, "ns=docker.io")
		f.Add(s, "")
	}
	f.Fuzz(func(t *testing.T, path, query string) {
		rt, err := ParsePath(path, query)
		if err != nil {
			var oe *Error
			if !errors.As(err, &oe) || oe.Status < 400 || oe.Status >= 500 {
				t.Fatalf("ParsePath(%q, %q): error %v is not a 4xx *Error", path, query, err)
			}
			return
		}
		if rt.Kind == KindBase {
			return
		}
		if ValidateName(rt.Name) != nil || strings.Contains(rt.Name, "..") {
			t.Fatalf("accepted invalid name %q", rt.Name)
		}
		if (rt.Tag == "") == (rt.Digest == "") {
			t.Fatalf("route %+v has neither or both of tag and digest", rt)
		}
		if rt.Digest != "" && rt.Digest.Validate() != nil {
			t.Fatalf("accepted invalid digest %q", rt.Digest)
		}
	})
}

// FuzzParseRange: a parsed range always lies inside the content.
func FuzzParseRange(f *testing.F) {
	for _, s := range []string{"bytes=0-4", "bytes=5-", "bytes=-3", "bytes=0-1,3-4", "bytes=x-1", "bytes=-0"} {
		f.Add(s, int64(10))
	}
	f.Fuzz(func(t *testing.T, header string, size int64) {
		if size < 0 {
			size = -size
		}
		br, ok, err := ParseRange(header, size)
		if err != nil || !ok {
			return
		}
		if br.Start < 0 || br.End < br.Start || br.End >= size || br.Length() <= 0 {
			t.Fatalf("ParseRange(%q, %d) = %+v outside the content", header, size, br)
		}
	})
}
