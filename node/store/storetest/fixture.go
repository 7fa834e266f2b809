package storetest

import (
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// ImageFixture describes img stored under tag.
func ImageFixture(t testing.TB, tag string, img v1.Image) Fixture {
	t.Helper()
	return Fixture{Tag: tag, Manifest: ImageDescriptor(t, img), Blobs: ImageBlobs(t, img)}
}

// IndexFixture describes idx stored under tag, with the image at position
// i of the index as the fixture's manifest.
func IndexFixture(t testing.TB, tag string, idx v1.ImageIndex, i int) Fixture {
	t.Helper()
	im, err := idx.IndexManifest()
	if err != nil {
		t.Fatalf("index manifest: %v", err)
	}
	img, err := idx.Image(im.Manifests[i].Digest)
	if err != nil {
		t.Fatalf("index image: %v", err)
	}
	d := describe(t, idx)
	return Fixture{Tag: tag, Manifest: ImageDescriptor(t, img), Index: &d, Blobs: ImageBlobs(t, img)}
}

// ImageDescriptor is the descriptor of img's manifest.
func ImageDescriptor(t testing.TB, img v1.Image) ocispec.Descriptor {
	t.Helper()
	return describe(t, img)
}

// ImageBlobs lists img's config and layers.
func ImageBlobs(t testing.TB, img v1.Image) []ocispec.Descriptor {
	t.Helper()
	m, err := img.Manifest()
	if err != nil {
		t.Fatalf("manifest: %v", err)
	}
	out := []ocispec.Descriptor{convert(m.Config)}
	for _, l := range m.Layers {
		out = append(out, convert(l))
	}
	return out
}

func describe(t testing.TB, x interface {
	Digest() (v1.Hash, error)
	Size() (int64, error)
}) ocispec.Descriptor {
	t.Helper()
	d, err := x.Digest()
	if err != nil {
		t.Fatalf("digest: %v", err)
	}
	n, err := x.Size()
	if err != nil {
		t.Fatalf("size: %v", err)
	}
	var mt string
	switch y := x.(type) {
	case v1.Image:
		m, err := y.MediaType()
		if err != nil {
			t.Fatalf("media type: %v", err)
		}
		mt = string(m)
	case v1.ImageIndex:
		m, err := y.MediaType()
		if err != nil {
			t.Fatalf("media type: %v", err)
		}
		mt = string(m)
	}
	return ocispec.Descriptor{MediaType: mt, Digest: digest.Digest(d.String()), Size: n}
}

func convert(d v1.Descriptor) ocispec.Descriptor {
	return ocispec.Descriptor{MediaType: string(d.MediaType), Digest: digest.Digest(d.Digest.String()), Size: d.Size}
}
