package store

import (
	"fmt"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// View is an immutable snapshot of what a store can serve: every digest
// reachable from an image, every tag, and the keys to advertise. Stores build
// a new View on each change and swap it in whole.
type View struct {
	Digests map[digest.Digest]ocispec.Descriptor
	Tags    map[string]digest.Digest // "docker.io/library/alpine:3.20" → manifest digest
	Keys    map[string]struct{}      // digests and tags, as advertised
}

// NewView returns an empty View.
func NewView() *View {
	return &View{Digests: map[digest.Digest]ocispec.Descriptor{}, Tags: map[string]digest.Digest{}, Keys: map[string]struct{}{}}
}

// Resolve maps a tag reference to its digest; unknown tags wrap ErrNotFound.
func (v *View) Resolve(ref string) (digest.Digest, error) {
	tag, ok := TagKey(ref)
	if !ok {
		return "", fmt.Errorf("resolve %q: not a tag reference: %w", ref, ErrNotFound)
	}
	d, ok := v.Tags[tag]
	if !ok {
		return "", fmt.Errorf("resolve %q: %w", ref, ErrNotFound)
	}
	return d, nil
}

// Stat describes a digest; unknown digests wrap ErrNotFound.
func (v *View) Stat(dgst digest.Digest) (ocispec.Descriptor, error) {
	desc, ok := v.Digests[dgst]
	if !ok {
		return ocispec.Descriptor{}, fmt.Errorf("stat %s: %w", dgst, ErrNotFound)
	}
	return desc, nil
}
