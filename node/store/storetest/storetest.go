// Package storetest is the conformance suite that every implementation of
// the node's Store runs against content it was seeded with.
package storetest

import (
	"context"
	"errors"
	"io"
	"os"
	"slices"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/shoal-oci/shoal/node/store"
)

// Store is the node's view of a local content source, as the node handler
// consumes it.
type Store interface {
	Resolve(ctx context.Context, ref string) (digest.Digest, error)
	Stat(ctx context.Context, dgst digest.Digest) (ocispec.Descriptor, error)
	Open(ctx context.Context, dgst digest.Digest) (io.ReadSeekCloser, error)
	Watch(ctx context.Context, ch chan<- store.Event) error
}

// Fixture describes what a store was seeded with.
type Fixture struct {
	// Tag is the normalized reference ("docker.io/library/x:t") of the image.
	Tag string
	// Manifest is the image manifest: Digest, Size and MediaType.
	Manifest ocispec.Descriptor
	// Index is the image index the tag points to, if any.
	Index *ocispec.Descriptor
	// Blobs are the config and layers (Digest and Size; MediaType optional).
	Blobs []ocispec.Descriptor
	// WantFile says Open must return an *os.File.
	WantFile bool
}

// Target is the digest the fixture's tag resolves to.
func (fx Fixture) Target() digest.Digest {
	if fx.Index != nil {
		return fx.Index.Digest
	}
	return fx.Manifest.Digest
}

// Keys lists every key the store must advertise for the fixture.
func (fx Fixture) Keys() []string {
	keys := []string{fx.Tag, fx.Manifest.Digest.String()}
	if fx.Index != nil {
		keys = append(keys, fx.Index.Digest.String())
	}
	for _, b := range fx.Blobs {
		keys = append(keys, b.Digest.String())
	}
	return keys
}

func (fx Fixture) content() []ocispec.Descriptor {
	all := []ocispec.Descriptor{fx.Manifest}
	if fx.Index != nil {
		all = append(all, *fx.Index)
	}
	return append(all, fx.Blobs...)
}

// unknown is a digest no store holds.
const unknown = digest.Digest("sha256:0000000000000000000000000000000000000000000000000000000000000000")

// Conformance runs the suite against s, which must hold fx.
func Conformance(t *testing.T, s Store, fx Fixture) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	t.Run("resolve_tag_to_target", func(t *testing.T) {
		got, err := s.Resolve(ctx, fx.Tag)
		if err != nil {
			t.Fatalf("Resolve(%q): %v", fx.Tag, err)
		}
		if got != fx.Target() {
			t.Fatalf("Resolve(%q) = %s, want %s", fx.Tag, got, fx.Target())
		}
	})

	t.Run("resolve_unknown_tag_is_not_found", func(t *testing.T) {
		_, err := s.Resolve(ctx, "docker.io/shoal/never-stored:none")
		if !errors.Is(err, store.ErrNotFound) {
			t.Fatalf("Resolve(unknown) error = %v, want ErrNotFound", err)
		}
	})

	t.Run("stat_describes_content", func(t *testing.T) {
		for _, want := range fx.content() {
			got, err := s.Stat(ctx, want.Digest)
			if err != nil {
				t.Fatalf("Stat(%s): %v", want.Digest, err)
			}
			if got.Digest != want.Digest || got.Size != want.Size {
				t.Errorf("Stat(%s) = %s/%d, want %s/%d", want.Digest, got.Digest, got.Size, want.Digest, want.Size)
			}
			if want.MediaType != "" && got.MediaType != "" && got.MediaType != want.MediaType {
				t.Errorf("Stat(%s).MediaType = %q, want %q", want.Digest, got.MediaType, want.MediaType)
			}
		}
		for _, m := range []ocispec.Descriptor{fx.Manifest} {
			got, _ := s.Stat(ctx, m.Digest)
			if got.MediaType != m.MediaType {
				t.Errorf("Stat(manifest %s).MediaType = %q, want %q", m.Digest, got.MediaType, m.MediaType)
			}
		}
		if fx.Index != nil {
			got, _ := s.Stat(ctx, fx.Index.Digest)
			if got.MediaType != fx.Index.MediaType {
				t.Errorf("Stat(index %s).MediaType = %q, want %q", fx.Index.Digest, got.MediaType, fx.Index.MediaType)
			}
		}
	})

	t.Run("stat_unknown_digest_is_not_found", func(t *testing.T) {
		_, err := s.Stat(ctx, unknown)
		if !errors.Is(err, store.ErrNotFound) {
			t.Fatalf("Stat(unknown) error = %v, want ErrNotFound", err)
		}
	})

	t.Run("open_returns_the_bytes", func(t *testing.T) {
		for _, want := range fx.content() {
			checkOpen(ctx, t, s, want, fx.WantFile)
		}
	})

	t.Run("open_unknown_digest_is_not_found", func(t *testing.T) {
		rc, err := s.Open(ctx, unknown)
		if err == nil {
			rc.Close()
		}
		if !errors.Is(err, store.ErrNotFound) {
			t.Fatalf("Open(unknown) error = %v, want ErrNotFound", err)
		}
	})

	t.Run("watch_sends_snapshot_first", func(t *testing.T) {
		wctx, wcancel := context.WithCancel(ctx)
		ch := make(chan store.Event, 16)
		done := make(chan error, 1)
		go func() { done <- s.Watch(wctx, ch) }()
		defer func() {
			wcancel()
			select {
			case <-done:
			case <-time.After(10 * time.Second):
				t.Error("Watch did not return after its context was cancelled")
			}
		}()
		select {
		case ev := <-ch:
			if ev.Kind != store.Snapshot {
				t.Fatalf("first event kind = %v, want Snapshot", ev.Kind)
			}
			for _, k := range fx.Keys() {
				if !slices.Contains(ev.Keys, k) {
					t.Errorf("snapshot lacks %q (has %v)", k, ev.Keys)
				}
			}
		case err := <-done:
			t.Fatalf("Watch returned before a snapshot: %v", err)
		case <-time.After(10 * time.Second):
			t.Fatal("no snapshot within 10s")
		}
	})
}

func checkOpen(ctx context.Context, t *testing.T, s Store, want ocispec.Descriptor, wantFile bool) {
	t.Helper()
	rc, err := s.Open(ctx, want.Digest)
	if err != nil {
		t.Fatalf("Open(%s): %v", want.Digest, err)
	}
	defer rc.Close()
	if _, isFile := rc.(*os.File); wantFile && !isFile {
		t.Errorf("Open(%s) = %T, want *os.File", want.Digest, rc)
	}
	v := want.Digest.Algorithm().Digester()
	n, err := io.Copy(v.Hash(), rc)
	if err != nil {
		t.Fatalf("read %s: %v", want.Digest, err)
	}
	if n != want.Size || v.Digest() != want.Digest {
		t.Fatalf("Open(%s) read %d bytes hashing to %s, want %d bytes", want.Digest, n, v.Digest(), want.Size)
	}
	// Seeking back must work: net/http serves ranges by seeking.
	if want.Size > 1 {
		if _, err := rc.Seek(1, io.SeekStart); err != nil {
			t.Fatalf("seek %s: %v", want.Digest, err)
		}
		rest, err := io.ReadAll(rc)
		if err != nil || int64(len(rest)) != want.Size-1 {
			t.Fatalf("read after seek %s: %d bytes, err %v; want %d bytes", want.Digest, len(rest), err, want.Size-1)
		}
	}
}
