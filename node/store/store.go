// Package store holds the implementations of the node's local content source:
// containerd's content store and an OCI image-layout directory. Both are
// consumed by the node handler through its own Store interface and both pass
// the conformance suite in node/store/storetest.
package store

import (
	"errors"
)

// ErrNotFound is returned (wrapped) for a tag or digest the store does not hold.
var ErrNotFound = errors.New("not found in local store")

// EventKind says what an Event means.
type EventKind int

// Event kinds.
const (
	// Snapshot carries the complete set of keys the store holds now. Any key
	// advertised before and missing from it must be withdrawn. A store sends
	// one first, and again after it reconnects to its backend.
	Snapshot EventKind = iota
	// Added carries keys that appeared.
	Added
	// Removed carries keys that disappeared.
	Removed
)

// Event is a change to the set of keys a store can serve. Keys are digests
// ("sha256:<hex>") and tag references ("docker.io/library/alpine:3.20").
type Event struct {
	Kind EventKind
	Keys []string
}
