package bench

import (
	"archive/tar"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// layout writes an OCI image layout by hand, so that benchmarks can make a
// 1 GiB layer or 10,000 small ones quickly, without compressing anything.
type ociLayout struct {
	dir       string
	manifests []ocispec.Descriptor
}

func newLayout(b testing.TB, dir string) *ociLayout {
	b.Helper()
	if err := os.MkdirAll(filepath.Join(dir, "blobs", "sha256"), 0o755); err != nil {
		b.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "oci-layout"), []byte(`{"imageLayoutVersion":"1.0.0"}`), 0o644); err != nil {
		b.Fatal(err)
	}
	l := &ociLayout{dir: dir}
	l.writeIndex(b)
	return l
}

// blobPath is where the blob d lives.
func (l *ociLayout) blobPath(d digest.Digest) string {
	return filepath.Join(l.dir, "blobs", d.Algorithm().String(), d.Encoded())
}

// put stores data as a blob.
func (l *ociLayout) put(b testing.TB, mt string, data []byte) ocispec.Descriptor {
	b.Helper()
	d := digest.FromBytes(data)
	if err := os.WriteFile(l.blobPath(d), data, 0o644); err != nil {
		b.Fatal(err)
	}
	return ocispec.Descriptor{MediaType: mt, Digest: d, Size: int64(len(data))}
}

// putRandom stores size pseudo-random bytes (seeded by seed) as a layer blob,
// streaming so that a 1 GiB blob costs no memory.
func (l *ociLayout) putRandom(b testing.TB, size int64, seed uint64) ocispec.Descriptor {
	b.Helper()
	return l.putStream(b, size, func(w io.Writer) error {
		_, err := io.CopyN(w, rand.NewChaCha8([32]byte{byte(seed), byte(seed >> 8), byte(seed >> 16), 1}), size)
		return err
	})
}

// putRandomTar stores an uncompressed tar layer of exactly size bytes (a
// multiple of 512, at least 2048): one file of pseudo-random bytes, so
// containerd can unpack it.
func (l *ociLayout) putRandomTar(b testing.TB, size int64, seed uint64) ocispec.Descriptor {
	b.Helper()
	return l.putStream(b, size, func(w io.Writer) error {
		fileSize := size - 512 - 1024
		tw := tar.NewWriter(w)
		if err := tw.WriteHeader(&tar.Header{Name: "random.bin", Mode: 0o644, Size: fileSize, Typeflag: tar.TypeReg}); err != nil {
			return err
		}
		if _, err := io.CopyN(tw, rand.NewChaCha8([32]byte{byte(seed), byte(seed >> 8), byte(seed >> 16), 2}), fileSize); err != nil {
			return err
		}
		return tw.Close() // writes the two zero blocks
	})
}

// putStream stores the size bytes write produces as a layer blob, hashing
// them on the way to disk.
func (l *ociLayout) putStream(b testing.TB, size int64, write func(io.Writer) error) ocispec.Descriptor {
	b.Helper()
	tmp, err := os.CreateTemp(filepath.Join(l.dir, "blobs"), "tmp-")
	if err != nil {
		b.Fatal(err)
	}
	h := sha256.New()
	if err := write(io.MultiWriter(tmp, h)); err != nil {
		b.Fatal(err)
	}
	if err := tmp.Close(); err != nil {
		b.Fatal(err)
	}
	d := digest.NewDigestFromEncoded(digest.SHA256, hex.EncodeToString(h.Sum(nil)))
	if err := os.Rename(tmp.Name(), l.blobPath(d)); err != nil {
		b.Fatal(err)
	}
	return ocispec.Descriptor{MediaType: ocispec.MediaTypeImageLayer, Digest: d, Size: size}
}

// addImageNoIndex writes a config and a manifest over layers and returns the
// manifest's descriptor, annotated with ref ("docker.io/library/bench:1g"),
// without touching index.json.
func (l *ociLayout) addImageNoIndex(b testing.TB, ref string, layers []ocispec.Descriptor) ocispec.Descriptor {
	b.Helper()
	diffIDs := make([]string, len(layers))
	for i, ly := range layers {
		diffIDs[i] = ly.Digest.String() // not a real diff ID; nothing here unpacks
	}
	cfg, _ := json.Marshal(map[string]any{
		"architecture": "amd64", "os": "linux",
		"rootfs": map[string]any{"type": "layers", "diff_ids": diffIDs},
		"config": map[string]any{"Labels": map[string]string{"ref": ref}},
	})
	cd := l.put(b, ocispec.MediaTypeImageConfig, cfg)
	m := ocispec.Manifest{MediaType: ocispec.MediaTypeImageManifest, Config: cd, Layers: layers}
	m.SchemaVersion = 2
	mb, _ := json.Marshal(m)
	md := l.put(b, ocispec.MediaTypeImageManifest, mb)
	md.Annotations = map[string]string{"io.containerd.image.name": ref, ocispec.AnnotationRefName: ref}
	return md
}

// addImage is addImageNoIndex plus an index.json that names the image.
func (l *ociLayout) addImage(b testing.TB, ref string, layers []ocispec.Descriptor) ocispec.Descriptor {
	b.Helper()
	md := l.addImageNoIndex(b, ref, layers)
	l.manifests = append(l.manifests, md)
	l.writeIndex(b)
	return md
}

// ocispecDescriptor is a short name for the descriptor type.
type ocispecDescriptor = ocispec.Descriptor

func (l *ociLayout) writeIndex(b testing.TB) {
	b.Helper()
	idx := ocispec.Index{MediaType: ocispec.MediaTypeImageIndex, Manifests: l.manifests}
	idx.SchemaVersion = 2
	if idx.Manifests == nil {
		idx.Manifests = []ocispec.Descriptor{}
	}
	ib, _ := json.Marshal(idx)
	tmp := filepath.Join(l.dir, "index.json.tmp")
	if err := os.WriteFile(tmp, ib, 0o644); err != nil {
		b.Fatal(err)
	}
	if err := os.Rename(tmp, filepath.Join(l.dir, "index.json")); err != nil {
		b.Fatal(err)
	}
}

// blobURL is the node's URL of blob d in repo, for registry docker.io.
func blobURL(base, repo string, d digest.Digest) string {
	return fmt.Sprintf("%s/v2/%s/blobs/%s?ns=docker.io", base, repo, d)
}
