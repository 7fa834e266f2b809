package auth

import (
	"crypto/sha256"
	"crypto/subtle"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"strings"

	"github.com/shoal-oci/shoal/oci"
)

// Token is the shared bearer token that node tiers present to the cache
// tier. The zero Token is empty: its Middleware lets every request through
// and its RoundTripper adds nothing. A Token prints and logs as "[redacted]".
//
// The secret sits behind a pointer so that even reflection-based printing
// of a struct that holds a Token in an unexported field (where fmt cannot
// call String) shows an address, not the token.
type Token struct{ secret *string }

// NewToken returns a Token holding s, with surrounding white space removed.
// An empty or all-white-space s gives the empty Token.
func NewToken(s string) Token {
	s = strings.TrimSpace(s)
	if s == "" {
		return Token{}
	}
	return Token{secret: &s}
}

func (t Token) value() string {
	if t.secret == nil {
		return ""
	}
	return *t.secret
}

// LoadToken reads a token from path; surrounding white space (a trailing
// newline, say) is removed. An empty path gives the empty Token. A token
// must not contain white space or control characters. Errors never quote
// the file.
func LoadToken(path string) (Token, error) {
	if path == "" {
		return Token{}, nil
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return Token{}, fmt.Errorf("auth: token: %w", err)
	}
	t := NewToken(string(b))
	for _, r := range t.value() {
		if r <= ' ' || r == 0x7f {
			return Token{}, fmt.Errorf("auth: token %s: contains white space or control characters", path)
		}
	}
	return t, nil
}

// Empty reports whether t holds no token, so that authentication is off.
func (t Token) Empty() bool { return t.value() == "" }

// String implements fmt.Stringer without revealing the token.
func (t Token) String() string { return Redacted }

// GoString implements fmt.GoStringer without revealing the token.
func (t Token) GoString() string { return Redacted }

// LogValue implements slog.LogValuer without revealing the token.
func (t Token) LogValue() slog.Value { return slog.StringValue(Redacted) }

// MarshalJSON keeps the token out of any JSON dump of a config.
func (t Token) MarshalJSON() ([]byte, error) { return []byte(`"` + Redacted + `"`), nil }

// valid compares in constant time; hashing first hides the length as well.
func (t Token) valid(got string) bool {
	a := sha256.Sum256([]byte(t.value()))
	b := sha256.Sum256([]byte(got))
	return subtle.ConstantTimeCompare(a[:], b[:]) == 1
}

// bearer extracts the credential of an "Authorization: Bearer <token>"
// header; the scheme is case-insensitive.
func bearer(h string) (string, bool) {
	scheme, cred, ok := strings.Cut(strings.TrimSpace(h), " ")
	if !ok || !strings.EqualFold(scheme, "Bearer") {
		return "", false
	}
	return strings.TrimSpace(cred), true
}

// Middleware requires "Authorization: Bearer <token>" on every request,
// /v2/ included, and answers anything else with 401 and an OCI UNAUTHORIZED
// error. With the empty Token it returns next unchanged.
func (t Token) Middleware(next http.Handler) http.Handler {
	if t.Empty() {
		return next
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		got, ok := bearer(r.Header.Get("Authorization"))
		if !ok || !t.valid(got) {
			e := oci.Errorf(http.StatusUnauthorized, oci.CodeUnauthorized, "a valid shoal client token is required")
			e.Header = http.Header{"Www-Authenticate": {`Bearer realm="shoal"`}}
			e.Write(w, r)
			return
		}
		next.ServeHTTP(w, r)
	})
}

// RoundTripper returns a transport that sends "Authorization: Bearer
// <token>" on every request through next (http.DefaultTransport when nil).
// With the empty Token it returns next unchanged.
func (t Token) RoundTripper(next http.RoundTripper) http.RoundTripper {
	if next == nil {
		next = http.DefaultTransport
	}
	if t.Empty() {
		return next
	}
	return tokenTransport{token: t, next: next}
}

type tokenTransport struct {
	token Token
	next  http.RoundTripper
}

// RoundTrip implements http.RoundTripper. It does not modify req.
func (tt tokenTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	if req == nil {
		return nil, errors.New("auth: nil request")
	}
	r := req.Clone(req.Context())
	r.Header.Set("Authorization", "Bearer "+tt.token.value())
	return tt.next.RoundTrip(r)
}

func (tt tokenTransport) String() string       { return Redacted }
func (tt tokenTransport) GoString() string     { return Redacted }
func (tt tokenTransport) LogValue() slog.Value { return slog.StringValue(Redacted) }
