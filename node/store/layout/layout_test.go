package layout

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/shoal-oci/shoal/node/store"
	"github.com/shoal-oci/shoal/node/store/storetest"
	"github.com/shoal-oci/shoal/test/harness"
)

func TestConformance(t *testing.T) {
	dir := t.TempDir()
	img := harness.RandomImage(t, 2, 1024)
	harness.WriteOCILayoutDir(t, dir, img, "docker.io/library/conf:1")
	idx := harness.RandomIndex(t)
	harness.WriteOCIIndexLayoutDir(t, dir, idx, "ghcr.io/shoal/multi:2")
	s, err := New(dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Run("image", func(t *testing.T) {
		fx := storetest.ImageFixture(t, "docker.io/library/conf:1", img)
		fx.WantFile = true
		storetest.Conformance(t, s, fx)
	})
	t.Run("index", func(t *testing.T) {
		fx := storetest.IndexFixture(t, "ghcr.io/shoal/multi:2", idx, 0)
		fx.WantFile = true
		storetest.Conformance(t, s, fx)
	})
}

// rewriteIndex applies f to the layout's index.json.
func rewriteIndex(t *testing.T, dir string, f func(*ocispec.Index)) {
	t.Helper()
	p := filepath.Join(dir, "index.json")
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	var idx ocispec.Index
	if err := json.Unmarshal(b, &idx); err != nil {
		t.Fatal(err)
	}
	f(&idx)
	if b, err = json.Marshal(idx); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

func TestTagNames(t *testing.T) {
	tests := []struct {
		name        string
		annotations map[string]string
		opts        []Option
		want        string // "" means no tag
	}{
		{"containerd_name_is_normalized", map[string]string{AnnotationContainerdImageName: "alpine:3.20"}, nil, "docker.io/library/alpine:3.20"},
		{"full_ref_name_is_used", map[string]string{AnnotationRefName: "ghcr.io/a/b:v1"}, nil, "ghcr.io/a/b:v1"},
		{"tag_only_ref_name_uses_default_repository", map[string]string{AnnotationRefName: "v2"},
			[]Option{WithDefaultRepository("docker.io/library/foo")}, "docker.io/library/foo:v2"},
		{"tag_only_ref_name_without_default_is_skipped", map[string]string{AnnotationRefName: "v2"}, nil, ""},
		{"digest_name_advertises_no_tag", map[string]string{AnnotationContainerdImageName: "docker.io/library/x@sha256:" + hex64}, nil, ""},
		{"no_annotation_no_tag", nil, nil, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			img := harness.RandomImage(t, 1, 64)
			harness.WriteOCILayoutDir(t, dir, img, "unused")
			rewriteIndex(t, dir, func(idx *ocispec.Index) { idx.Manifests[0].Annotations = tt.annotations })
			s, err := New(dir, tt.opts...)
			if err != nil {
				t.Fatal(err)
			}
			var tags []string
			for k := range s.current().Keys {
				if _, err := digest.Parse(k); err != nil {
					tags = append(tags, k)
				}
			}
			want := []string{}
			if tt.want != "" {
				want = []string{tt.want}
			}
			if !slices.Equal(append([]string{}, tags...), want) {
				t.Fatalf("tags = %v, want %v", tags, want)
			}
			if tt.want != "" {
				d, err := s.Resolve(context.Background(), tt.want)
				if m := storetest.ImageDescriptor(t, img); err != nil || d != m.Digest {
					t.Fatalf("Resolve = %s, %v; want %s", d, err, m.Digest)
				}
			}
		})
	}
}

const hex64 = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"

func TestMissingChildrenAreNotServed(t *testing.T) {
	dir := t.TempDir()
	img := harness.RandomImage(t, 2, 64)
	harness.WriteOCILayoutDir(t, dir, img, "docker.io/library/partial:1")
	blobs := storetest.ImageBlobs(t, img)
	gone := blobs[len(blobs)-1].Digest
	if err := os.Remove(filepath.Join(dir, "blobs", "sha256", gone.Encoded())); err != nil {
		t.Fatal(err)
	}
	s, err := New(dir)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if _, err := s.Stat(ctx, gone); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("Stat(missing layer) error = %v, want ErrNotFound", err)
	}
	if _, err := s.Stat(ctx, blobs[0].Digest); err != nil {
		t.Fatalf("Stat(config) = %v, want found", err)
	}
}

func TestOpenRejectsEscapingDigests(t *testing.T) {
	dir := t.TempDir()
	harness.WriteOCILayoutDir(t, dir, harness.RandomImage(t, 1, 64), "docker.io/library/x:1")
	if err := os.WriteFile(filepath.Join(filepath.Dir(dir), "secret"), []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	s, err := New(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range []digest.Digest{"sha256:../../../secret", "../../secret", digest.Digest("sha256:" + hex64[:10])} {
		rc, err := s.Open(context.Background(), d)
		if err == nil {
			rc.Close()
		}
		if !errors.Is(err, store.ErrNotFound) {
			t.Errorf("Open(%q) error = %v, want ErrNotFound", d, err)
		}
	}
}

func TestWatchFollowsIndex(t *testing.T) {
	dir := t.TempDir()
	a := harness.RandomImage(t, 1, 64)
	harness.WriteOCILayoutDir(t, dir, a, "docker.io/library/a:1")
	s, err := New(dir, WithPollInterval(20*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	ch := make(chan store.Event, 8)
	done := make(chan error, 1)
	go func() { done <- s.Watch(ctx, ch) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Watch = %v after cancel, want nil", err)
		}
	}()
	recv := func(kind store.EventKind) []string {
		t.Helper()
		select {
		case ev := <-ch:
			if ev.Kind != kind {
				t.Fatalf("event %v %v, want kind %v", ev.Kind, ev.Keys, kind)
			}
			return ev.Keys
		case <-time.After(5 * time.Second):
			t.Fatalf("no event of kind %v", kind)
		}
		return nil
	}
	keysA := storetest.ImageFixture(t, "docker.io/library/a:1", a).Keys()
	if got := recv(store.Snapshot); !sameSet(got, keysA) {
		t.Fatalf("snapshot = %v, want %v", got, keysA)
	}

	b := harness.RandomImage(t, 1, 64)
	harness.WriteOCILayoutDir(t, dir, b, "docker.io/library/b:1")
	keysB := storetest.ImageFixture(t, "docker.io/library/b:1", b).Keys()
	if got := recv(store.Added); !sameSet(got, keysB) {
		t.Fatalf("added = %v, want %v", got, keysB)
	}

	rewriteIndex(t, dir, func(idx *ocispec.Index) {
		idx.Manifests = slices.DeleteFunc(idx.Manifests, func(d ocispec.Descriptor) bool {
			return d.Annotations[AnnotationContainerdImageName] == "docker.io/library/a:1"
		})
	})
	if got := recv(store.Removed); !sameSet(got, keysA) {
		t.Fatalf("removed = %v, want %v", got, keysA)
	}
}

func sameSet(a, b []string) bool {
	a, b = slices.Sorted(slices.Values(a)), slices.Sorted(slices.Values(b))
	return slices.Equal(a, b)
}
