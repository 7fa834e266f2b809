package oci

import "net/http"

// The herd protocol, between a node and the cache tier. When many nodes ask
// the cache tier for one blob at the same moment (a scale-out), the cache
// tier serves the first few itself and tells the others which nodes are
// receiving the blob already; those nodes serve it to them as it arrives.
//
//   - A node's blob GET carries HerdPeerHeader: the node's peer ID.
//   - The cache tier either serves the blob, or answers HerdRedirectStatus
//     with HerdReceiversHeader: the peer IDs of nodes receiving it, nearest
//     the source first, comma-separated.
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
)

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
