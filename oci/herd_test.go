package oci

import (
	"slices"
	"strings"
	"testing"
)

// TestHerdAddrs: only what can be a multiaddr passes, without its /p2p
// part, once, and at most MaxHerdAddrs of them.
func TestHerdAddrs(t *testing.T) {
	for _, c := range []struct {
		in   string
		want []string
	}{
		{"", nil},
		{"/ip4/10.0.0.1/tcp/5001", []string{"/ip4/10.0.0.1/tcp/5001"}},
		{" /ip4/10.0.0.1/tcp/5001/p2p/QmA , /ip6/fd00::1/tcp/5001,/ip4/10.0.0.1/tcp/5001", []string{"/ip4/10.0.0.1/tcp/5001", "/ip6/fd00::1/tcp/5001"}},
		{"ip4/10.0.0.1,/ip4/1 2,/ip4/x\r\nSet-Cookie:a,/," + "/" + strings.Repeat("a", MaxHerdAddrLen), nil},
		{"/a,/b,/c,/d,/e,/f", []string{"/a", "/b", "/c", "/d"}},
	} {
		if got := HerdAddrs(c.in); !slices.Equal(got, c.want) {
			t.Errorf("HerdAddrs(%q) = %q, want %q", c.in, got, c.want)
		}
	}
}
