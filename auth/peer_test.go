package auth

import (
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
)

func TestPeerKey(t *testing.T) {
	psk := make([]byte, 32)
	for i := range psk {
		psk[i] = byte(i)
	}
	k := NewPeerKey(psk)
	other := NewPeerKey(append([]byte{1}, psk[1:]...))
	now := time.Unix(1_800_000_000, 0)
	ok := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(204) })
	h := k.Middleware(ok, func() time.Time { return now })
	req := func(method, uri string) *http.Request { return httptest.NewRequest(method, uri, nil) }
	signed := func(key PeerKey, at time.Time, method, uri string) *http.Request {
		r := req(method, uri)
		key.Sign(r, at)
		return r
	}
	const uri = "/v2/library/x/blobs/sha256:aa?ns=docker.io"
	cases := []struct {
		name string
		r    *http.Request
		want int
	}{
		{"signed", signed(k, now, "GET", uri), 204},
		{"signed_a_minute_off", signed(k, now.Add(-time.Minute), "GET", uri), 204},
		{"unsigned", req("GET", uri), 401},
		{"other_psk", signed(other, now, "GET", uri), 401},
		{"too_old", signed(k, now.Add(-PeerSkew-time.Second), "GET", uri), 401},
		{"from_the_future", signed(k, now.Add(PeerSkew+time.Second), "GET", uri), 401},
		{"garbage", func() *http.Request { r := req("GET", uri); r.Header.Set(PeerHeader, "v1 t=x sig=zz"); return r }(), 401},
	}
	// A signature for one request does not open another.
	moved := signed(k, now, "GET", uri)
	moved.URL.RawQuery = "ns=ghcr.io"
	moved.RequestURI = ""
	cases = append(cases, struct {
		name string
		r    *http.Request
		want int
	}{"other_uri", moved, 401})
	head := signed(k, now, "GET", uri)
	head.Method = "HEAD"
	cases = append(cases, struct {
		name string
		r    *http.Request
		want int
	}{"other_method", head, 401})
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			w := httptest.NewRecorder()
			h.ServeHTTP(w, tc.r)
			if w.Code != tc.want {
				t.Fatalf("status %d, want %d (%s)", w.Code, tc.want, w.Body)
			}
			if tc.want == 401 && tc.r.Method == "GET" && !strings.Contains(w.Body.String(), `"UNAUTHORIZED"`) {
				t.Fatalf("refusal is not an OCI error: %s", w.Body)
			}
		})
	}
	if s := fmt.Sprintf("%v|%+v|%#v", k, k, k); s != Redacted+"|"+Redacted+"|"+Redacted {
		t.Fatalf("key printed as %q", s)
	}
	if !NewPeerKey(nil).Empty() || NewPeerKey(nil).Middleware(ok, nil) == nil {
		t.Fatal("zero key")
	}
}
