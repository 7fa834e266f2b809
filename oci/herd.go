package oci

import (
	"net/http"
	"slices"
	"strings"
)

// The herd protocol, between a node and the cache tier. When many nodes ask
// the cache tier for one blob at the same moment (a scale-out), the cache
// tier serves the first few itself and tells the others which nodes are
// receiving the blob already; those nodes serve it to them as it arrives.
//
//   - A node's blob GET carries HerdPeerHeader: the node's peer ID, and
//     HerdAddrsHeader: the multiaddrs it can be dialled at, comma-separated.
//   - The cache tier either serves the blob, or answers HerdRedirectStatus
//     with HerdReceiversHeader: the peer IDs of nodes receiving it, nearest
//     the source first, comma-separated; and HerdReceiverAddrsHeader: the
//     addresses those nodes gave, each ending in /p2p/<peer ID>, so that
//     the node can dial them at once rather than look them up in the DHT.
//     Addresses are hints: a dial authenticates the peer ID, so a wrong
//     one only fails.
//   - A node whose receivers could not serve asks again with
//     HerdDirectHeader, and the cache tier serves it.
//
// A request without HerdPeerHeader (crane, a node built before the herd
// protocol) is always served.
const (
	HerdPeerHeader      = "Shoal-Herd-Peer"
	HerdDirectHeader    = "Shoal-Herd-Direct"
	HerdReceiversHeader = "Shoal-Herd-Receivers"
	HerdRedirectStatus  = http.StatusConflict

	HerdAddrsHeader         = "Shoal-Herd-Addrs"
	HerdReceiverAddrsHeader = "Shoal-Herd-Receiver-Addrs"
)

// Bounds of the addresses in the herd headers.
const (
	// MaxHerdAddrs is how many addresses a node gives.
	MaxHerdAddrs = 4
	// MaxHerdAddrLen bounds one address (without /p2p/<ID>).
	MaxHerdAddrLen = 200
)

// HerdAddrs returns the addresses of a HerdAddrsHeader value that can be
// multiaddrs: at most MaxHerdAddrs distinct ones, each starting with '/',
// at most MaxHerdAddrLen long, of letters, digits and "/.:-_". It drops the
// rest, and any /p2p part, which the peer ID gives.
func HerdAddrs(v string) []string {
	var out []string
	for _, a := range strings.Split(v, ",") {
		a = strings.TrimSpace(a)
		if i := strings.Index(a, "/p2p/"); i >= 0 {
			a = a[:i]
		}
		if len(out) == MaxHerdAddrs || !validHerdAddr(a) || slices.Contains(out, a) {
			continue
		}
		out = append(out, a)
	}
	return out
}

func validHerdAddr(a string) bool {
	if len(a) < 2 || len(a) > MaxHerdAddrLen || a[0] != '/' {
		return false
	}
	for i := 0; i < len(a); i++ {
		c := a[i]
		if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || strings.IndexByte("/.:-_", c) >= 0) {
			return false
		}
	}
	return true
}

// MaxPeerIDLen bounds a peer ID in the herd headers; a libp2p ID of an
// Ed25519 key is 52 characters.
const MaxPeerIDLen = 128

// ValidPeerID reports whether id can be a peer ID in the herd headers:
// 1 to MaxPeerIDLen letters and digits (the base58 and base32 alphabets).
func ValidPeerID(id string) bool {
	if id == "" || len(id) > MaxPeerIDLen {
		return false
	}
	for i := 0; i < len(id); i++ {
		c := id[i]
		if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9') {
			return false
		}
	}
	return true
}
