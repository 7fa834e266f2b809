// Package wire is the format of the node tier's gossip announcements: which
// keys a node has started or stopped holding. It depends on nothing but the
// standard library, so the decoder, which reads bytes from any peer, can be
// fuzzed on its own.
//
// A message is:
//
//	byte 0     Version
//	byte 1     OpAdd or OpRemove
//	bytes 2..  one or more 32-byte key hashes (sha256 of the key string)
package wire

import (
	"crypto/sha256"
	"errors"
	"fmt"
)

const (
	// Version is the only message version this package reads and writes.
	Version = 1
	// OpAdd announces keys the sender now holds.
	OpAdd = 1
	// OpRemove announces keys the sender no longer holds.
	OpRemove = 2
	// MaxKeys bounds one message (128 KiB of hashes); Encode splits a
	// bigger batch into several.
	MaxKeys = 4096
	// MaxSize is the largest valid message in bytes.
	MaxSize = 2 + 32*MaxKeys
)

// Hash is the sha256 of a key string: the digest inside the key's CID, and
// the form keys take in announcements.
type Hash [32]byte

// HashKey returns the hash of key.
func HashKey(key string) Hash { return sha256.Sum256([]byte(key)) }

// Announcement is a decoded message.
type Announcement struct {
	Op   byte
	Keys []Hash
}

// ErrMalformed is wrapped by every Decode error.
var ErrMalformed = errors.New("malformed announcement")

// Encode splits keys into messages of at most MaxKeys each.
func Encode(op byte, keys []Hash) [][]byte {
	var out [][]byte
	for len(keys) > 0 {
		n := min(len(keys), MaxKeys)
		b := make([]byte, 2, 2+32*n)
		b[0], b[1] = Version, op
		for _, k := range keys[:n] {
			b = append(b, k[:]...)
		}
		out = append(out, b)
		keys = keys[n:]
	}
	return out
}

// Decode parses one message.
func Decode(b []byte) (Announcement, error) {
	if len(b) < 2+32 {
		return Announcement{}, fmt.Errorf("%w: %d bytes", ErrMalformed, len(b))
	}
	if b[0] != Version {
		return Announcement{}, fmt.Errorf("%w: version %d", ErrMalformed, b[0])
	}
	op := b[1]
	if op != OpAdd && op != OpRemove {
		return Announcement{}, fmt.Errorf("%w: op %d", ErrMalformed, op)
	}
	body := b[2:]
	if len(body)%32 != 0 || len(body)/32 > MaxKeys {
		return Announcement{}, fmt.Errorf("%w: %d bytes of keys", ErrMalformed, len(body))
	}
	a := Announcement{Op: op, Keys: make([]Hash, len(body)/32)}
	for i := range a.Keys {
		copy(a.Keys[i][:], body[32*i:])
	}
	return a, nil
}
