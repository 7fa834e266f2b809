package auth

import (
	"strings"
	"testing"
)

// FuzzParseDockerConfig: any config.json either parses or fails with an
// error that quotes none of the input (it may hold a secret). Never a panic.
func FuzzParseDockerConfig(f *testing.F) {
	for _, s := range []string{
		`{"auths":{"https://index.docker.io/v1/":{"auth":"dXNlcjpwYXNz"}}}`,
		`{"auths":{"ghcr.io":{"username":"u","password":"p"}}}`,
		`{"auths":{"x":{"auth":"!!notbase64"}}}`, `{"auths":{"x":{"auth":"bm9jb2xvbg=="}}}`,
		`{"auths":{"x":{"identitytoken":"tok"}}}`, `{}`, `[`, `{"auths":null}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		_, err := parseDockerConfig(b)
		if err != nil && len(b) >= 8 && strings.Contains(err.Error(), string(b)) {
			t.Fatalf("error quotes the input: %v", err)
		}
	})
}

// FuzzParsePSK: a key file either yields exactly 32 bytes or an error.
func FuzzParsePSK(f *testing.F) {
	f.Add([]byte(PSKHeader + "\n/base16/\n" + strings.Repeat("ab", 32) + "\n"))
	f.Add([]byte(strings.Repeat("0f", 32)))
	f.Add([]byte(PSKHeader + "\n/base64/\nAAAA\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		k, err := ParsePSK(b)
		if err == nil && len(k) != 32 {
			t.Fatalf("ParsePSK accepted a %d-byte key", len(k))
		}
	})
}
