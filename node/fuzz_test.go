package node

import (
	"bufio"
	"bytes"
	"io"
	"net/http"
	"testing"

	"github.com/opencontainers/go-digest"

	"github.com/shoal-oci/shoal/oci"
)

// FuzzPeerResponse: whatever bytes a peer sends as its response head, the
// node reads them within its header bound and either rejects the answer or
// accepts a span that lies inside the blob and matches the request. Never a
// panic.
func FuzzPeerResponse(f *testing.F) {
	d := digest.FromString("blob")
	for _, s := range []string{
		"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nblob",
		"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 1-3/4\r\nContent-Length: 3\r\n\r\nlob",
		"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 3-1/4\r\n\r\n",
		"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nblob\r\n0\r\n\r\n",
		"HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\n", "garbage\r\n\r\n", "HTTP/1.1 404 Not Found\r\n\r\n",
	} {
		f.Add([]byte(s), "")
		f.Add([]byte(s), "bytes=1-")
	}
	rt := oci.Route{Kind: oci.KindBlob, Name: "x", Registry: "docker.io", Digest: d}
	f.Fuzz(func(t *testing.T, raw []byte, rng string) {
		req, _ := http.NewRequest(http.MethodGet, "http://peer/v2/x/blobs/"+d.String(), nil)
		lim := &headLimit{r: bytes.NewReader(raw), left: maxPeerHead}
		resp, err := http.ReadResponse(bufio.NewReaderSize(lim, 32<<10), req)
		if err != nil {
			return
		}
		defer resp.Body.Close()
		lim.left = -1
		s, err := checkBlob(rt, resp, rng)
		if err != nil {
			return
		}
		if s.start < 0 || s.end < s.start || s.end >= s.total {
			t.Fatalf("accepted span %+v outside the blob", s)
		}
		_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 1<<20))
	})
}
