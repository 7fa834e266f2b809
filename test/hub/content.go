package hub

import (
	"context"
	"fmt"
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/opencontainers/go-digest"
)

// Image returns a random OCI image with the given number of layers of size
// bytes each, whose config says linux/amd64 so that containerd accepts it.
func Image(t testing.TB, size, layers int64) v1.Image {
	t.Helper()
	return platformImage(t, size, layers, v1.Platform{OS: "linux", Architecture: "amd64"})
}

// Index returns a random OCI image index with one single-layer image of size
// bytes per platform, e.g. "linux/amd64", "linux/arm64/v8". Each child's
// config and index descriptor carry its platform.
func Index(t testing.TB, size int64, platforms ...string) v1.ImageIndex {
	t.Helper()
	var idx v1.ImageIndex = empty.Index
	idx = mutate.IndexMediaType(idx, "application/vnd.oci.image.index.v1+json")
	for _, p := range platforms {
		parts := strings.Split(p, "/")
		if len(parts) < 2 {
			t.Fatalf("hub: platform %q is not os/arch[/variant]", p)
		}
		plat := v1.Platform{OS: parts[0], Architecture: parts[1]}
		if len(parts) > 2 {
			plat.Variant = parts[2]
		}
		img := platformImage(t, size, 1, plat)
		idx = mutate.AppendManifests(idx, mutate.IndexAddendum{
			Add:        img,
			Descriptor: v1.Descriptor{MediaType: "application/vnd.oci.image.manifest.v1+json", Platform: &plat},
		})
	}
	return idx
}

func platformImage(t testing.TB, size, layers int64, plat v1.Platform) v1.Image {
	t.Helper()
	img, err := random.Image(size, layers)
	if err != nil {
		t.Fatalf("hub: random image: %v", err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatalf("hub: config file: %v", err)
	}
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture, cf.Variant = plat.OS, plat.Architecture, plat.Variant
	img, err = mutate.ConfigFile(img, cf)
	if err != nil {
		t.Fatalf("hub: set platform: %v", err)
	}
	return img
}

// Push writes img to repo:tag through the admin listener, bypassing tokens,
// limits, faults and counters, and returns the manifest digest.
func (h *Hub) Push(t testing.TB, repo, tag string, img v1.Image) digest.Digest {
	t.Helper()
	ref := h.adminTag(t, repo, tag)
	if err := remote.Write(ref, img, remote.WithContext(context.Background())); err != nil {
		t.Fatalf("hub: push %s: %v", ref, err)
	}
	d, err := img.Digest()
	if err != nil {
		t.Fatalf("hub: digest: %v", err)
	}
	return DigestOf(d)
}

// PushIndex writes idx and all its children to repo:tag like Push, and
// returns the index digest.
func (h *Hub) PushIndex(t testing.TB, repo, tag string, idx v1.ImageIndex) digest.Digest {
	t.Helper()
	ref := h.adminTag(t, repo, tag)
	if err := remote.WriteIndex(ref, idx, remote.WithContext(context.Background())); err != nil {
		t.Fatalf("hub: push index %s: %v", ref, err)
	}
	d, err := idx.Digest()
	if err != nil {
		t.Fatalf("hub: digest: %v", err)
	}
	return DigestOf(d)
}

// Retag points an existing tag at img (pushing img first), as when an
// upstream publisher moves "latest", and returns img's digest.
func (h *Hub) Retag(t testing.TB, repo, tag string, img v1.Image) digest.Digest {
	t.Helper()
	return h.Push(t, repo, tag, img)
}

// AdminHost is the admin listener's "127.0.0.1:P", for pushing with other
// clients (oras push): like Push, it bypasses tokens, limits and counters.
func (h *Hub) AdminHost() string { return strings.TrimPrefix(h.admin.URL, "http://") }

func (h *Hub) adminTag(t testing.TB, repo, tag string) name.Tag {
	t.Helper()
	ref, err := name.NewTag(fmt.Sprintf("%s/%s:%s", h.AdminHost(), repo, tag), name.Insecure)
	if err != nil {
		t.Fatalf("hub: reference: %v", err)
	}
	return ref
}

// DigestOf converts a go-containerregistry hash to a go-digest digest.
func DigestOf(h v1.Hash) digest.Digest { return digest.Digest(h.String()) }
