package e2e

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/shoal-oci/shoal/test/harness"
)

// (f) Bad input gets a clear OCI error with the right status, never a panic
// or a hang: against the node holding the content (A) and the one relaying
// it (B).
func TestBadInput(t *testing.T) {
	sites := startSites(t, harness.ContainerdV2, harness.ContainerdV2, harness.ContainerdV2)
	a, b := sites[0], sites[1]
	img := harness.RandomImage(t, 1, 4<<10)
	importImage(t, a.ctrd, img, "docker.io/library/sane:v1")
	m, _, ls := imageDigests(t, img)
	layer := ls[0].String()
	blobPath := "/v2/library/sane/blobs/" + layer + "?ns=docker.io"
	eventually(t, 10*time.Second, "B sees A's image", func() error {
		return headManifest(b, "library/sane", "v1", m.String())
	})

	// A client that sends a request line and headers, then nothing: the
	// server must drop it, not wait forever. Runs alongside the rest.
	slow := make(chan error, 1)
	go func() { slow <- slowloris(b.shoal.RegistryAddr, 20*time.Second) }()

	longName := strings.Repeat("abcdefghi/", 30) + "x" // 301 characters
	longNS := strings.Repeat("a", 300) + ".example.com"
	hugeNS := strings.Repeat("a", 10000)
	cases := []struct {
		name    string
		method  string
		target  string // request-target, sent verbatim
		headers []string
		status  int
		code    string // OCI error code; empty: no envelope expected
	}{
		{"malformed digest", "GET", "/v2/library/sane/blobs/sha256:xyz?ns=docker.io", nil, 400, "DIGEST_INVALID"},
		{"malformed manifest digest", "GET", "/v2/library/sane/manifests/sha256:" + strings.Repeat("g", 64) + "?ns=docker.io", nil, 400, "DIGEST_INVALID"},
		{"unknown digest algorithm", "GET", "/v2/library/sane/blobs/md5:d41d8cd98f00b204e9800998ecf8427e?ns=docker.io", nil, 400, "DIGEST_INVALID"},
		{"dot-dot in name", "GET", "/v2/library/../sane/manifests/v1?ns=docker.io", nil, 400, "NAME_INVALID"},
		{"escaped dot-dot in name", "GET", "/v2/library/%2e%2e/sane/manifests/v1?ns=docker.io", nil, 400, "NAME_INVALID"},
		{"over-long name", "GET", "/v2/" + longName + "/manifests/v1?ns=docker.io", nil, 400, "NAME_INVALID"},
		{"invalid tag", "GET", "/v2/library/sane/manifests/-v1?ns=docker.io", nil, 400, "MANIFEST_INVALID"},
		{"blob by tag", "GET", "/v2/library/sane/blobs/v1?ns=docker.io", nil, 400, "DIGEST_INVALID"},
		{"DELETE", "DELETE", "/v2/library/sane/manifests/v1?ns=docker.io", nil, 405, "UNSUPPORTED"},
		{"PUT", "PUT", "/v2/library/sane/manifests/v1?ns=docker.io", []string{"Content-Length", "0"}, 405, "UNSUPPORTED"},
		{"PATCH", "PATCH", "/v2/library/sane/blobs/uploads/x?ns=docker.io", []string{"Content-Length", "0"}, 405, "UNSUPPORTED"},
		{"POST upload", "POST", "/v2/library/sane/blobs/uploads/?ns=docker.io", []string{"Content-Length", "0"}, 405, "UNSUPPORTED"},
		{"range past the end", "GET", blobPath, []string{"Range", "bytes=99999999-"}, 416, "RANGE_INVALID"},
		{"multiple ranges", "GET", blobPath, []string{"Range", "bytes=0-1,5-6"}, 416, "RANGE_INVALID"},
		{"long ns", "GET", "/v2/library/sane/manifests/v1?ns=" + longNS, nil, 400, "NAME_INVALID"},
		{"huge ns", "GET", "/v2/library/sane/manifests/v1?ns=" + hugeNS, nil, 414, "NAME_INVALID"},
		{"two ns", "GET", "/v2/library/sane/manifests/v1?ns=docker.io&ns=quay.io", nil, 400, "NAME_INVALID"},
		{"registry not mirrored", "GET", "/v2/library/sane/manifests/v1?ns=evil.example.com", nil, 404, "NAME_UNKNOWN"},
		{"unknown route", "GET", "/v2/library/sane/tags/list?ns=docker.io", nil, 404, "NAME_UNKNOWN"},
		{"unknown tag", "GET", "/v2/library/sane/manifests/nope?ns=docker.io", nil, 404, "MANIFEST_UNKNOWN"},
		{"unknown blob", "GET", "/v2/library/sane/blobs/sha256:" + strings.Repeat("0", 64) + "?ns=docker.io", nil, 404, "BLOB_UNKNOWN"},
		{"10 KB header", "GET", "/v2/", []string{"X-Padding", strings.Repeat("p", 10<<10)}, 200, ""},
		{"100 KB header", "GET", "/v2/", []string{"X-Padding", strings.Repeat("p", 100<<10)}, 431, ""},
	}
	for _, s := range []*site{a, b} {
		for _, tc := range cases {
			t.Run(s.name+"/"+tc.name, func(t *testing.T) {
				resp, body, err := rawRequest(s.shoal.RegistryAddr, tc.method, tc.target, tc.headers...)
				if err != nil {
					t.Fatalf("%s %.80s: %v", tc.method, tc.target, err)
				}
				if resp.StatusCode != tc.status {
					t.Fatalf("%s %.80s: status %d, want %d; body %.300s", tc.method, tc.target, resp.StatusCode, tc.status, body)
				}
				if tc.code == "" {
					return
				}
				if ct := resp.Header.Get("Content-Type"); !strings.HasPrefix(ct, "application/json") {
					t.Errorf("Content-Type %q, want application/json", ct)
				}
				var env struct {
					Errors []struct {
						Code    string `json:"code"`
						Message string `json:"message"`
					} `json:"errors"`
				}
				if err := json.Unmarshal(body, &env); err != nil || len(env.Errors) == 0 {
					t.Fatalf("body is not an OCI error envelope: %v: %.300s", err, body)
				}
				if env.Errors[0].Code != tc.code || env.Errors[0].Message == "" {
					t.Errorf("error %+v, want code %s with a message", env.Errors[0], tc.code)
				}
			})
		}
	}
	// HEAD errors carry the status but no body.
	resp, body := request(t, http.MethodHead, b.shoal.URL()+"/v2/library/sane/blobs/sha256:xyz?ns=docker.io")
	if resp.StatusCode != http.StatusBadRequest || len(body) != 0 {
		t.Errorf("HEAD malformed digest: %s with %d body bytes, want 400 and no body", resp.Status, len(body))
	}
	// A valid range still works on both, locally and relayed.
	for _, s := range []*site{a, b} {
		resp, body := request(t, http.MethodGet, s.shoal.URL()+blobPath, "Range", "bytes=0-9")
		if resp.StatusCode != http.StatusPartialContent || len(body) != 10 {
			t.Errorf("%s: Range bytes=0-9: %s with %d bytes, want 206 and 10", s.name, resp.Status, len(body))
		}
	}

	if err := <-slow; err != nil {
		t.Errorf("slow client: %v", err)
	}
	for _, s := range sites {
		if !s.shoal.Alive() {
			t.Errorf("node %s died: %v", s.name, s.shoal.ExitErr())
		}
	}
	requireNoPanic(t, sites...)
}

// rawRequest sends one request with the request-target exactly as given
// (no client-side cleaning or escaping) and reads the answer, within 10s.
func rawRequest(addr, method, target string, hdr ...string) (*http.Response, []byte, error) {
	conn, err := net.DialTimeout("tcp", addr, 2*time.Second)
	if err != nil {
		return nil, nil, err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
	var sb strings.Builder
	fmt.Fprintf(&sb, "%s %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n", method, target, addr)
	for i := 0; i+1 < len(hdr); i += 2 {
		fmt.Fprintf(&sb, "%s: %s\r\n", hdr[i], hdr[i+1])
	}
	sb.WriteString("\r\n")
	if _, err := io.WriteString(conn, sb.String()); err != nil {
		return nil, nil, err
	}
	resp, err := http.ReadResponse(bufio.NewReader(conn), &http.Request{Method: method})
	if err != nil {
		return nil, nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	return resp, body, err
}

// slowloris sends an unfinished request and waits for the server to close
// the connection (or answer). It fails if that takes longer than limit.
func slowloris(addr string, limit time.Duration) error {
	conn, err := net.DialTimeout("tcp", addr, 2*time.Second)
	if err != nil {
		return err
	}
	defer conn.Close()
	if _, err := io.WriteString(conn, "GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Slow: "); err != nil {
		return err
	}
	start := time.Now()
	_ = conn.SetReadDeadline(start.Add(limit))
	_, err = io.Copy(io.Discard, conn)
	if errors.Is(err, os.ErrDeadlineExceeded) {
		return fmt.Errorf("server kept a half-sent request open for %s", limit)
	}
	return nil
}

// TestPeerPortRefusesUnauthenticated: a node's content is open only to its
// own containerd (the loopback registry port) and to nodes holding the PSK
// (the peer port). A client without the credential gets 401 UNAUTHORIZED on
// the peer port, for manifests and blobs alike, while B, a node with the
// PSK, pulls the same content from A through that port.
func TestPeerPortRefusesUnauthenticated(t *testing.T) {
	sites := startSites(t, harness.ContainerdV2, harness.ContainerdV2)
	a, b := sites[0], sites[1]
	img := harness.RandomImage(t, 1, 4<<10)
	importImage(t, a.ctrd, img, "docker.io/library/private:v1")
	m, _, ls := imageDigests(t, img)
	eventually(t, 10*time.Second, "B sees A's image", func() error {
		return headManifest(b, "library/private", "v1", m.String())
	})
	for _, path := range []string{
		"/v2/library/private/manifests/" + m.String() + "?ns=docker.io",
		"/v2/library/private/blobs/" + ls[0].String() + "?ns=docker.io",
		"/v2/library/private/manifests/v1?ns=docker.io",
	} {
		resp, body, err := rawRequest(a.shoal.PeerAddr, "GET", path)
		if err != nil {
			t.Fatalf("GET %s on the peer port: %v", path, err)
		}
		if resp.StatusCode != http.StatusUnauthorized || !strings.Contains(string(body), `"UNAUTHORIZED"`) {
			t.Fatalf("unauthenticated GET %s on the peer port: %d %s; want 401 UNAUTHORIZED", path, resp.StatusCode, body)
		}
	}
	resp, body, err := rawRequest(b.shoal.RegistryAddr, "GET", "/v2/library/private/blobs/"+ls[0].String()+"?ns=docker.io")
	if err != nil || resp.StatusCode != http.StatusOK || int64(len(body)) != resp.ContentLength || len(body) < 4<<10 {
		t.Fatalf("B relaying A's layer: %v %v %d bytes", err, resp, len(body))
	}
}
