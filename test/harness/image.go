package harness

import (
	"archive/tar"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// Annotations that name an image in an OCI layout's index.json. containerd's
// importer reads the first, other tools the second.
const (
	AnnotationContainerdImageName = "io.containerd.image.name"
	AnnotationRefName             = "org.opencontainers.image.ref.name"
)

// RandomLayer returns a gzip-compressed OCI layer of about size random bytes.
func RandomLayer(t testing.TB, size int64) v1.Layer {
	t.Helper()
	l, err := random.Layer(size, types.OCILayer)
	if err != nil {
		t.Fatalf("random layer: %v", err)
	}
	return l
}

// ImageWithLayers returns an OCI image for linux/amd64 made of layers. Two
// images built from the same layer share its blob.
func ImageWithLayers(t testing.TB, layers ...v1.Layer) v1.Image {
	t.Helper()
	return platformImage(t, "amd64", layers...)
}

func platformImage(t testing.TB, arch string, layers ...v1.Layer) v1.Image {
	t.Helper()
	img := mutate.MediaType(empty.Image, types.OCIManifestSchema1)
	img = mutate.ConfigMediaType(img, types.OCIConfigJSON)
	img, err := mutate.AppendLayers(img, layers...)
	if err != nil {
		t.Fatalf("append layers: %v", err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatalf("config file: %v", err)
	}
	cf = cf.DeepCopy()
	// Without a platform, `ctr images import` filters the image out.
	cf.OS, cf.Architecture = "linux", arch
	img, err = mutate.ConfigFile(img, cf)
	if err != nil {
		t.Fatalf("set config: %v", err)
	}
	return img
}

// RandomImage returns an OCI image for linux/amd64 with layers random layers
// of about layerSize bytes each.
func RandomImage(t testing.TB, layers int, layerSize int64) v1.Image {
	t.Helper()
	ls := make([]v1.Layer, layers)
	for i := range ls {
		ls[i] = RandomLayer(t, layerSize)
	}
	return ImageWithLayers(t, ls...)
}

// RandomIndex returns an OCI image index with one random image per
// architecture (default amd64 and arm64), each with one small layer.
func RandomIndex(t testing.TB, archs ...string) v1.ImageIndex {
	t.Helper()
	if len(archs) == 0 {
		archs = []string{"amd64", "arm64"}
	}
	idx := mutate.IndexMediaType(empty.Index, types.OCIImageIndex)
	for _, arch := range archs {
		img := platformImage(t, arch, RandomLayer(t, 256))
		idx = mutate.AppendManifests(idx, mutate.IndexAddendum{
			Add:        img,
			Descriptor: v1.Descriptor{Platform: &v1.Platform{OS: "linux", Architecture: arch}},
		})
	}
	return idx
}

// WriteOCILayoutDir writes img into the OCI image layout at dir (created or
// appended to), named name (a full reference) in index.json.
func WriteOCILayoutDir(t testing.TB, dir string, img v1.Image, name string) {
	t.Helper()
	p := layoutPath(t, dir)
	if err := p.AppendImage(img, layout.WithAnnotations(nameAnnotations(name))); err != nil {
		t.Fatalf("write image to layout %s: %v", dir, err)
	}
}

// WriteOCIIndexLayoutDir writes idx and its images into the OCI image layout
// at dir, named name in index.json.
func WriteOCIIndexLayoutDir(t testing.TB, dir string, idx v1.ImageIndex, name string) {
	t.Helper()
	p := layoutPath(t, dir)
	if err := p.AppendIndex(idx, layout.WithAnnotations(nameAnnotations(name))); err != nil {
		t.Fatalf("write index to layout %s: %v", dir, err)
	}
}

// WriteOCILayoutTar writes img as an OCI layout tar, named name, that
// `ctr images import` imports under that name with its digests unchanged.
func WriteOCILayoutTar(t testing.TB, img v1.Image, name string) string {
	t.Helper()
	dir := t.TempDir()
	WriteOCILayoutDir(t, dir, img, name)
	return tarDir(t, dir)
}

// WriteOCIIndexLayoutTar is WriteOCILayoutTar for an image index.
func WriteOCIIndexLayoutTar(t testing.TB, idx v1.ImageIndex, name string) string {
	t.Helper()
	dir := t.TempDir()
	WriteOCIIndexLayoutDir(t, dir, idx, name)
	return tarDir(t, dir)
}

func nameAnnotations(name string) map[string]string {
	return map[string]string{AnnotationContainerdImageName: name, AnnotationRefName: name}
}

func layoutPath(t testing.TB, dir string) layout.Path {
	t.Helper()
	if p, err := layout.FromPath(dir); err == nil {
		return p
	}
	p, err := layout.Write(dir, empty.Index)
	if err != nil {
		t.Fatalf("create layout %s: %v", dir, err)
	}
	return p
}

// tarDir packs dir into a tar file next to it and returns its path.
func tarDir(t testing.TB, dir string) string {
	t.Helper()
	out := filepath.Join(t.TempDir(), "image.tar")
	f, err := os.Create(out)
	if err != nil {
		t.Fatalf("create tar: %v", err)
	}
	defer f.Close()
	tw := tar.NewWriter(f)
	err = filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil || path == dir {
			return err
		}
		rel, err := filepath.Rel(dir, path)
		if err != nil {
			return err
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		hdr, err := tar.FileInfoHeader(info, "")
		if err != nil {
			return err
		}
		hdr.Name = filepath.ToSlash(rel)
		if d.IsDir() {
			hdr.Name += "/"
		}
		if err := tw.WriteHeader(hdr); err != nil {
			return err
		}
		if d.IsDir() {
			return nil
		}
		src, err := os.Open(path)
		if err != nil {
			return err
		}
		defer src.Close()
		_, err = io.Copy(tw, src)
		return err
	})
	if err == nil {
		err = tw.Close()
	}
	if err != nil {
		t.Fatalf("tar %s: %v", dir, err)
	}
	return out
}
