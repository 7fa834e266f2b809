// Package layout implements the node's Store on an OCI image-layout
// directory (index.json and blobs/<alg>/<hex>), for development, air-gapped
// nodes and tests. Only content reachable from index.json is served.
package layout

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/shoal-oci/shoal/node/store"
	"github.com/shoal-oci/shoal/oci"
)

// Annotations in index.json that name an image.
const (
	// AnnotationContainerdImageName holds a full reference.
	AnnotationContainerdImageName = "io.containerd.image.name"
	// AnnotationRefName holds a full reference or only a tag.
	AnnotationRefName = ocispec.AnnotationRefName
)

// DefaultPollInterval is how often Watch looks at index.json by default.
const DefaultPollInterval = 2 * time.Second

// Option configures a Store.
type Option func(*Store)

// WithDefaultRepository names the repository ("docker.io/library/foo") that
// a tag-only org.opencontainers.image.ref.name belongs to. Without it, such
// entries advertise no tag.
func WithDefaultRepository(repo string) Option {
	return func(s *Store) { s.defaultRepo = repo }
}

// WithPollInterval sets how often Watch looks for changes to index.json.
func WithPollInterval(d time.Duration) Option {
	return func(s *Store) {
		if d > 0 {
			s.poll = d
		}
	}
}

// WithLogger sets the logger (default: discard).
func WithLogger(l *slog.Logger) Option {
	return func(s *Store) {
		if l != nil {
			s.log = l
		}
	}
}

// Store serves the images of an OCI image-layout directory.
type Store struct {
	dir         string
	defaultRepo string
	poll        time.Duration
	log         *slog.Logger

	mu    sync.RWMutex
	view  *store.View
	stamp stamp
}

// stamp identifies a version of index.json.
type stamp struct {
	mtime time.Time
	size  int64
}

// New opens the layout at dir, which must hold an index.json.
func New(dir string, opts ...Option) (*Store, error) {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return nil, fmt.Errorf("layout store: %w", err)
	}
	s := &Store{dir: abs, poll: DefaultPollInterval, log: slog.New(slog.DiscardHandler)}
	for _, o := range opts {
		o(s)
	}
	s.log = s.log.With("store", "layout", "dir", abs)
	if _, err := s.reload(); err != nil {
		return nil, fmt.Errorf("layout store: %w", err)
	}
	return s, nil
}

// Resolve maps a tag reference to the digest index.json names for it.
func (s *Store) Resolve(_ context.Context, ref string) (digest.Digest, error) {
	return s.current().Resolve(ref)
}

// Stat describes content reachable from index.json.
func (s *Store) Stat(_ context.Context, dgst digest.Digest) (ocispec.Descriptor, error) {
	return s.current().Stat(dgst)
}

// Open returns the blob file.
func (s *Store) Open(_ context.Context, dgst digest.Digest) (io.ReadSeekCloser, error) {
	if _, ok := s.current().Digests[dgst]; !ok {
		return nil, fmt.Errorf("open %s: %w", dgst, store.ErrNotFound)
	}
	p, err := s.blobPath(dgst)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", dgst, store.ErrNotFound)
	}
	f, err := os.Open(p)
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("open %s: %w", dgst, store.ErrNotFound)
	}
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", dgst, err)
	}
	return f, nil
}

// Watch sends a Snapshot, then Added and Removed events when index.json
// changes. It returns nil when ctx is done.
func (s *Store) Watch(ctx context.Context, ch chan<- store.Event) error {
	sent := s.current().Keys
	if err := send(ctx, ch, store.Event{Kind: store.Snapshot, Keys: store.SortedKeys(sent)}); err != nil {
		return nil
	}
	tick := time.NewTicker(s.poll)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-tick.C:
		}
		changed, err := s.reload()
		if err != nil {
			s.log.Warn("cannot reload image layout; keeping what was loaded", "err", err)
			continue
		}
		if !changed {
			continue
		}
		now := s.current().Keys
		added, removed := store.Diff(sent, now)
		if len(added) > 0 {
			if send(ctx, ch, store.Event{Kind: store.Added, Keys: added}) != nil {
				return nil
			}
		}
		if len(removed) > 0 {
			if send(ctx, ch, store.Event{Kind: store.Removed, Keys: removed}) != nil {
				return nil
			}
		}
		sent = now
	}
}

func send(ctx context.Context, ch chan<- store.Event, ev store.Event) error {
	select {
	case ch <- ev:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (s *Store) current() *store.View {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.view
}

// blobPath maps a digest to its file, refusing digests that are not well
// formed (and so could name a path outside the layout).
func (s *Store) blobPath(dgst digest.Digest) (string, error) {
	if err := dgst.Validate(); err != nil {
		return "", err
	}
	return filepath.Join(s.dir, "blobs", dgst.Algorithm().String(), dgst.Encoded()), nil
}

// reload reads index.json again when it changed and reports whether it did.
func (s *Store) reload() (bool, error) {
	p := filepath.Join(s.dir, ocispec.ImageIndexFile)
	st, err := os.Stat(p)
	if err != nil {
		return false, fmt.Errorf("stat index: %w", err)
	}
	now := stamp{mtime: st.ModTime(), size: st.Size()}
	s.mu.RLock()
	same := s.view != nil && s.stamp == now
	s.mu.RUnlock()
	if same {
		return false, nil
	}
	b, err := readLimited(p)
	if err != nil {
		return false, fmt.Errorf("read index: %w", err)
	}
	var idx ocispec.Index
	if err := json.Unmarshal(b, &idx); err != nil {
		return false, fmt.Errorf("parse %s: %w", p, err)
	}
	v := s.build(idx)
	s.mu.Lock()
	s.view, s.stamp = v, now
	s.mu.Unlock()
	return true, nil
}

// build walks every entry of index.json.
func (s *Store) build(idx ocispec.Index) *store.View {
	v := &store.View{Digests: map[digest.Digest]ocispec.Descriptor{}, Tags: map[string]digest.Digest{}, Keys: map[string]struct{}{}}
	for _, root := range idx.Manifests {
		if !s.walk(root, v) {
			continue
		}
		if tag, ok := s.tagOf(root); ok {
			if _, taken := v.Tags[tag]; !taken {
				v.Tags[tag] = root.Digest
			}
		}
	}
	for d := range v.Digests {
		v.Keys[d.String()] = struct{}{}
	}
	for t := range v.Tags {
		v.Keys[t] = struct{}{}
	}
	return v
}

// walk adds root and what it reaches to v; it reports whether root exists.
func (s *Store) walk(root ocispec.Descriptor, v *store.View) bool {
	queue := []ocispec.Descriptor{root}
	rootOK := false
	for len(queue) > 0 {
		d := queue[0]
		queue = queue[1:]
		if _, seen := v.Digests[d.Digest]; seen {
			rootOK = rootOK || d.Digest == root.Digest
			continue
		}
		p, err := s.blobPath(d.Digest)
		if err != nil {
			s.log.Warn("skipping malformed digest", "digest", d.Digest, "err", err)
			continue
		}
		st, err := os.Stat(p)
		if err != nil || !st.Mode().IsRegular() || (d.Size > 0 && st.Size() != d.Size) {
			continue // missing content is fine: it is just not served
		}
		v.Digests[d.Digest] = ocispec.Descriptor{MediaType: d.MediaType, Digest: d.Digest, Size: st.Size()}
		if d.Digest == root.Digest {
			rootOK = true
		}
		if d.MediaType != "" && !oci.IsManifestMediaType(d.MediaType) {
			continue
		}
		kids, mt := s.children(p)
		if d.MediaType == "" && mt != "" {
			v.Digests[d.Digest] = ocispec.Descriptor{MediaType: mt, Digest: d.Digest, Size: st.Size()}
		}
		queue = append(queue, kids...)
	}
	return rootOK
}

// children parses a manifest or index file and returns what it references
// and the media type it declares or has the shape of.
func (s *Store) children(path string) ([]ocispec.Descriptor, string) {
	b, err := readLimited(path)
	if err != nil {
		return nil, ""
	}
	mt := oci.SniffManifestMediaType(b)
	if mt == "" {
		return nil, ""
	}
	var m struct {
		Config    *ocispec.Descriptor  `json:"config"`
		Layers    []ocispec.Descriptor `json:"layers"`
		Manifests []ocispec.Descriptor `json:"manifests"`
	}
	if err := json.Unmarshal(b, &m); err != nil {
		return nil, mt
	}
	var out []ocispec.Descriptor
	if m.Config != nil {
		out = append(out, *m.Config)
	}
	out = append(out, m.Layers...)
	out = append(out, m.Manifests...)
	return out, mt
}

// tagOf returns the normalized tag an index.json entry is named by.
func (s *Store) tagOf(d ocispec.Descriptor) (string, bool) {
	if name := d.Annotations[AnnotationContainerdImageName]; name != "" {
		if tag, ok := store.TagKey(name); ok {
			return tag, true
		}
	}
	name := d.Annotations[AnnotationRefName]
	if name == "" {
		return "", false
	}
	if strings.ContainsAny(name, "/:@") {
		return store.TagKey(name)
	}
	if s.defaultRepo == "" {
		return "", false
	}
	return store.TagKey(s.defaultRepo + ":" + name)
}

func readLimited(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, oci.MaxManifestSize+1))
	if err != nil {
		return nil, err
	}
	if len(b) > oci.MaxManifestSize {
		return nil, fmt.Errorf("%s is larger than %d bytes", path, oci.MaxManifestSize)
	}
	return b, nil
}
