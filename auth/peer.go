package auth

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"log/slog"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/shoal-oci/shoal/oci"
)

// PeerHeader carries a peer request's credential:
//
//	X-Shoal-Peer-Auth: v1 t=<unix seconds> sig=<hex HMAC-SHA256>
//
// The signature covers the method, the request URI (path and query) and
// the time, under a key derived from the cluster's pre-shared key. Only
// nodes that hold the PSK can read content from a node's peer port.
const PeerHeader = "X-Shoal-Peer-Auth"

// PeerSkew is how far a peer request's time may lie from the server's.
// Within it a captured request could be replayed, but only as the same
// read of the same content, and only by someone on the path between nodes.
const PeerSkew = 5 * time.Minute

// PeerKey signs and checks peer requests. Its zero value has no key: it
// signs nothing and its Middleware lets everything through. It prints and
// logs as "[redacted]".
type PeerKey struct{ key *[32]byte }

// NewPeerKey derives the peer-request key from the libp2p PSK. The PSK
// itself never leaves the node; a different label keeps the two uses apart.
// An empty psk gives the zero PeerKey.
func NewPeerKey(psk []byte) PeerKey {
	if len(psk) == 0 {
		return PeerKey{}
	}
	m := hmac.New(sha256.New, psk)
	m.Write([]byte("shoal peer request key v1"))
	var k [32]byte
	copy(k[:], m.Sum(nil))
	return PeerKey{key: &k}
}

// Empty reports whether k has no key.
func (k PeerKey) Empty() bool { return k.key == nil }

// String implements fmt.Stringer.
func (k PeerKey) String() string { return Redacted }

// GoString implements fmt.GoStringer.
func (k PeerKey) GoString() string { return Redacted }

// LogValue implements slog.LogValuer.
func (k PeerKey) LogValue() slog.Value { return slog.StringValue(Redacted) }

func (k PeerKey) sig(method, uri string, t int64) []byte {
	m := hmac.New(sha256.New, k.key[:])
	fmt.Fprintf(m, "%s\n%s\n%d", method, uri, t)
	return m.Sum(nil)
}

// Sign adds the credential to req, as of now. The zero PeerKey adds nothing.
func (k PeerKey) Sign(req *http.Request, now time.Time) {
	if k.Empty() {
		return
	}
	t := now.Unix()
	req.Header.Set(PeerHeader, "v1 t="+strconv.FormatInt(t, 10)+" sig="+hex.EncodeToString(k.sig(req.Method, req.URL.RequestURI(), t)))
}

// Verify checks the credential of r as of now.
func (k PeerKey) Verify(r *http.Request, now time.Time) error {
	v := r.Header.Get(PeerHeader)
	if v == "" {
		return fmt.Errorf("no %s header", PeerHeader)
	}
	fields := strings.Fields(v)
	if len(fields) != 3 || fields[0] != "v1" {
		return fmt.Errorf("malformed %s header", PeerHeader)
	}
	ts, ok1 := strings.CutPrefix(fields[1], "t=")
	sh, ok2 := strings.CutPrefix(fields[2], "sig=")
	t, err := strconv.ParseInt(ts, 10, 64)
	if !ok1 || !ok2 || err != nil {
		return fmt.Errorf("malformed %s header", PeerHeader)
	}
	if d := now.Sub(time.Unix(t, 0)); d > PeerSkew || d < -PeerSkew {
		return fmt.Errorf("peer request time is %s away from this node's clock", d.Round(time.Second))
	}
	got, err := hex.DecodeString(sh)
	if err != nil || !hmac.Equal(got, k.sig(r.Method, r.URL.RequestURI(), t)) {
		return fmt.Errorf("bad peer request signature")
	}
	return nil
}

// Middleware refuses every request without a valid credential with 401
// and an OCI UNAUTHORIZED error. With the zero PeerKey it returns next
// unchanged. now is the clock; nil means time.Now.
func (k PeerKey) Middleware(next http.Handler, now func() time.Time) http.Handler {
	if k.Empty() {
		return next
	}
	if now == nil {
		now = time.Now
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if err := k.Verify(r, now()); err != nil {
			oci.Errorf(http.StatusUnauthorized, oci.CodeUnauthorized, "peer request refused: %v; this port serves only nodes that hold the cluster's pre-shared key", err).Write(w, r)
			return
		}
		next.ServeHTTP(w, r)
	})
}
