package containerd

import (
	"context"
	"errors"
	"fmt"
	"slices"

	"github.com/containerd/containerd/v2/core/images"
	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/shoal-oci/shoal/node/store"
	"github.com/shoal-oci/shoal/oci"
)

// imageRecord is what one containerd image record references.
type imageRecord struct {
	name   string
	tag    string // normalized tag key, "" when the name carries none
	target ocispec.Descriptor
	// descs is every descriptor reachable from target, present or not.
	descs map[digest.Digest]ocispec.Descriptor
}

func (s *Store) currentView() *store.View {
	s.viewMu.RLock()
	defer s.viewMu.RUnlock()
	return s.view
}

// rebuildLocked derives the view from the scan state: digests referenced by
// some image and present in the content store, and tags whose target is
// present. Callers hold s.mu.
func (s *Store) rebuildLocked() {
	v := store.NewView()
	names := make([]string, 0, len(s.images))
	for name := range s.images {
		names = append(names, name)
	}
	// Sorted, so that when two names normalize to one tag the choice is stable.
	slices.Sort(names)
	for _, name := range names {
		rec := s.images[name]
		for d, desc := range rec.descs {
			if !s.present[d] {
				continue
			}
			if _, seen := v.Digests[d]; !seen || v.Digests[d].MediaType == "" {
				v.Digests[d] = ocispec.Descriptor{MediaType: desc.MediaType, Digest: d, Size: desc.Size}
			}
		}
		if rec.tag != "" && s.present[rec.target.Digest] {
			if _, taken := v.Tags[rec.tag]; !taken {
				v.Tags[rec.tag] = rec.target.Digest
			}
		}
	}
	for d := range v.Digests {
		v.Keys[d.String()] = struct{}{}
	}
	for tag := range v.Tags {
		v.Keys[tag] = struct{}{}
	}
	// Forget presence and children of digests no image references any more.
	referenced := map[digest.Digest]bool{}
	for _, rec := range s.images {
		for d := range rec.descs {
			referenced[d] = true
		}
	}
	for d := range s.present {
		if !referenced[d] {
			delete(s.present, d)
		}
	}
	for d := range s.children {
		if !referenced[d] {
			delete(s.children, d)
		}
	}
	s.viewMu.Lock()
	s.view = v
	s.viewMu.Unlock()
	s.metrics.keys.Set(float64(len(v.Keys)))
}

// rescan rebuilds the state from the full image list.
func (s *Store) rescan(ctx context.Context) error {
	ctx = s.nsCtx(ctx)
	imgs, err := s.client.ImageService().List(ctx)
	if err != nil {
		return fmt.Errorf("list images: %w", err)
	}
	recs := make(map[string]*imageRecord, len(imgs))
	for _, img := range imgs {
		rec, err := s.walkImage(ctx, img)
		if err != nil {
			return err
		}
		recs[img.Name] = rec
	}
	present := map[digest.Digest]bool{}
	for _, rec := range recs {
		for d := range rec.descs {
			if _, done := present[d]; done {
				continue
			}
			ok, err := s.has(ctx, d)
			if err != nil {
				return err
			}
			present[d] = ok
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.images = recs
	s.present = present
	s.rebuildLocked()
	return nil
}

// refreshImage re-reads one image record by name (gone: dropped).
func (s *Store) refreshImage(ctx context.Context, name string) error {
	ctx = s.nsCtx(ctx)
	img, err := s.client.ImageService().Get(ctx, name)
	if isNotFound(err) {
		s.dropImage(name)
		return nil
	}
	if err != nil {
		return fmt.Errorf("get image %q: %w", name, err)
	}
	rec, err := s.walkImage(ctx, img)
	if err != nil {
		return err
	}
	present := make(map[digest.Digest]bool, len(rec.descs))
	for d := range rec.descs {
		ok, err := s.has(ctx, d)
		if err != nil {
			return err
		}
		present[d] = ok
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.images[name] = rec
	for d, ok := range present {
		s.present[d] = ok
	}
	s.rebuildLocked()
	return nil
}

func (s *Store) dropImage(name string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.images, name)
	s.rebuildLocked()
}

// contentChanged records that dgst appeared or went away. When it is a
// manifest an image references, those images are walked again: their
// children may be known now.
func (s *Store) contentChanged(ctx context.Context, dgst digest.Digest, ok bool) error {
	s.mu.Lock()
	var rewalk []string
	referenced := false
	for name, rec := range s.images {
		desc, refs := rec.descs[dgst]
		if !refs {
			continue
		}
		referenced = true
		if ok && oci.IsManifestMediaType(desc.MediaType) {
			if _, known := s.children[dgst]; !known {
				rewalk = append(rewalk, name)
			}
		}
	}
	if referenced {
		s.present[dgst] = ok
		s.rebuildLocked()
	}
	s.mu.Unlock()
	for _, name := range rewalk {
		if err := s.refreshImage(ctx, name); err != nil {
			return err
		}
	}
	return nil
}

// walkImage collects every descriptor reachable from the image's target.
// Children of manifests that are missing are simply not known.
func (s *Store) walkImage(ctx context.Context, img images.Image) (*imageRecord, error) {
	rec := &imageRecord{name: img.Name, target: img.Target, descs: map[digest.Digest]ocispec.Descriptor{}}
	rec.tag, _ = store.TagKey(img.Name)
	queue := []ocispec.Descriptor{img.Target}
	for len(queue) > 0 {
		d := queue[0]
		queue = queue[1:]
		if _, seen := rec.descs[d.Digest]; seen || d.Digest.Validate() != nil {
			continue
		}
		rec.descs[d.Digest] = d
		kids, err := s.childrenOf(ctx, d)
		if err != nil {
			return nil, fmt.Errorf("walk image %q: %w", img.Name, err)
		}
		queue = append(queue, kids...)
	}
	return rec, nil
}

// childrenOf returns the descriptors a manifest or index references, from a
// cache (manifests are immutable) or via images.Children.
func (s *Store) childrenOf(ctx context.Context, desc ocispec.Descriptor) ([]ocispec.Descriptor, error) {
	if !images.IsManifestType(desc.MediaType) && !images.IsIndexType(desc.MediaType) {
		return nil, nil
	}
	s.mu.Lock()
	kids, ok := s.children[desc.Digest]
	s.mu.Unlock()
	if ok {
		return kids, nil
	}
	kids, err := images.Children(ctx, s.cs, desc)
	switch {
	case err == nil:
	case errdefs.IsUnavailable(err) || ctx.Err() != nil:
		return nil, err
	default:
		// Missing (not pulled for this platform, discarded) or unreadable:
		// its children are unknown and not served.
		s.log.Debug("no children for manifest", "digest", desc.Digest, "err", err)
		return nil, nil
	}
	s.mu.Lock()
	s.children[desc.Digest] = kids
	s.mu.Unlock()
	return kids, nil
}

// has reports whether the content store holds dgst.
func (s *Store) has(ctx context.Context, dgst digest.Digest) (bool, error) {
	_, err := s.cs.Info(ctx, dgst)
	if err == nil {
		return true, nil
	}
	if isNotFound(err) {
		return false, nil
	}
	return false, fmt.Errorf("content info %s: %w", dgst, err)
}

func isNotFound(err error) bool {
	return err != nil && (errdefs.IsNotFound(err) || errors.Is(err, store.ErrNotFound))
}
