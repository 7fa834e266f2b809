package store

import (
	"github.com/distribution/reference"
	"github.com/opencontainers/go-digest"
)

// TagKey returns the normalized tag key ("docker.io/library/alpine:3.20")
// for an image name, and false when the name carries no tag: a digest-only
// reference, a name with both tag and digest (the tag is not what the record
// resolves), or a name that is not a reference at all.
func TagKey(name string) (string, bool) {
	if _, err := digest.Parse(name); err == nil {
		// CRI keeps an image-ID record named "sha256:<hex>".
		return "", false
	}
	named, err := reference.ParseNormalizedNamed(name)
	if err != nil {
		return "", false
	}
	if _, ok := named.(reference.Digested); ok {
		return "", false
	}
	tagged, ok := named.(reference.NamedTagged)
	if !ok {
		return "", false
	}
	return tagged.String(), true
}
