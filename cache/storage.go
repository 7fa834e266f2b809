package cache

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"strings"
	"time"

	"github.com/distribution/distribution/v3"
	"github.com/distribution/distribution/v3/registry/storage"
	storagedriver "github.com/distribution/distribution/v3/registry/storage/driver"
	"github.com/distribution/distribution/v3/registry/storage/driver/factory"
	"github.com/distribution/reference"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	// Manifest schemas the manifest store parses.
	_ "github.com/distribution/distribution/v3/manifest/manifestlist"
	_ "github.com/distribution/distribution/v3/manifest/ocischema"
	_ "github.com/distribution/distribution/v3/manifest/schema2"

	// Storage drivers, selectable by name; the cloud ones are in drivers_cloud.go.
	_ "github.com/distribution/distribution/v3/registry/storage/driver/filesystem"
	_ "github.com/distribution/distribution/v3/registry/storage/driver/inmemory"
)

// blobRepo is the one storage repository that holds every cached blob, so a
// layer shared by many repositories and registries is stored once.
const blobRepo = "shoal/blobs"

// tagRoot is where tag records live in the driver, beside distribution's tree.
const tagRoot = "/shoal/tags"

// NewDriver creates a distribution storage driver by name ("filesystem",
// "inmemory", "s3", "gcs", "azure") with its parameters.
func NewDriver(ctx context.Context, name string, params map[string]any) (storagedriver.StorageDriver, error) {
	if name == "s3" {
		name = "s3aws"
	}
	d, err := factory.Create(ctx, name, params)
	if err != nil && !cloudDrivers && (name == "s3aws" || name == "gcs" || name == "azure") {
		return nil, fmt.Errorf("storage driver %q is not in this build (built with -tags nocloud): %w", name, err)
	}
	if err != nil {
		return nil, fmt.Errorf("storage driver %q: %w", name, err)
	}
	return d, nil
}

// store is the cache's view of distribution storage: blobs in one shared
// repository, manifests per upstream repository, tag records beside them.
type store struct {
	driver storagedriver.StorageDriver
	ns     distribution.Namespace
	blobs  distribution.BlobStore
}

func newStore(ctx context.Context, driver storagedriver.StorageDriver) (*store, error) {
	ns, err := storage.NewRegistry(ctx, driver, storage.EnableDelete)
	if err != nil {
		return nil, fmt.Errorf("storage: %w", err)
	}
	named, err := reference.WithName(blobRepo)
	if err != nil {
		return nil, err
	}
	repo, err := ns.Repository(ctx, named)
	if err != nil {
		return nil, fmt.Errorf("storage: blob repository: %w", err)
	}
	return &store{driver: driver, ns: ns, blobs: repo.Blobs(ctx)}, nil
}

// storageName maps registry + repository to a storage repository name. A
// port's colon is not allowed in storage paths, so it becomes a dash.
func storageName(registry, repo string) (reference.Named, error) {
	return reference.WithName(strings.ReplaceAll(registry, ":", "-") + "/" + repo)
}

func (s *store) manifests(ctx context.Context, registry, repo string) (distribution.ManifestService, error) {
	named, err := storageName(registry, repo)
	if err != nil {
		return nil, fmt.Errorf("storage name: %w", err)
	}
	r, err := s.ns.Repository(ctx, named)
	if err != nil {
		return nil, fmt.Errorf("storage repository %s: %w", named, err)
	}
	// Blobs arrive after their manifest in a pull-through cache.
	return r.Manifests(ctx, storage.SkipLayerVerification())
}

// statBlob returns the blob's descriptor, or ok=false if it is not stored.
func (s *store) statBlob(ctx context.Context, d digest.Digest) (ocispec.Descriptor, bool, error) {
	desc, err := s.blobs.Stat(ctx, d)
	if errors.Is(err, distribution.ErrBlobUnknown) {
		return ocispec.Descriptor{}, false, nil
	}
	if err != nil {
		return ocispec.Descriptor{}, false, fmt.Errorf("stat blob %s: %w", d, err)
	}
	return desc, true, nil
}

func (s *store) openBlob(ctx context.Context, d digest.Digest) (io.ReadSeekCloser, error) {
	rc, err := s.blobs.Open(ctx, d)
	if err != nil {
		return nil, fmt.Errorf("open blob %s: %w", d, err)
	}
	return rc, nil
}

// commitBlob stores a verified spool as blob d and returns its size.
// distribution re-checks the digest on commit.
func (s *store) commitBlob(ctx context.Context, d digest.Digest, spool *os.File) (int64, error) {
	fi, err := spool.Stat()
	if err != nil {
		return 0, fmt.Errorf("spool: %w", err)
	}
	w, err := s.blobs.Create(ctx)
	if err != nil {
		return 0, fmt.Errorf("create blob %s: %w", d, err)
	}
	if _, err := w.ReadFrom(spool); err != nil {
		_ = w.Cancel(ctx)
		return 0, fmt.Errorf("write blob %s: %w", d, err)
	}
	if _, err := w.Commit(ctx, ocispec.Descriptor{Digest: d, Size: fi.Size(), MediaType: "application/octet-stream"}); err != nil {
		_ = w.Cancel(ctx)
		return 0, fmt.Errorf("commit blob %s: %w", d, err)
	}
	return fi.Size(), nil
}

func (s *store) deleteBlob(ctx context.Context, d digest.Digest) error {
	return s.blobs.Delete(ctx, d)
}

// getManifest returns a stored manifest's bytes and media type.
func (s *store) getManifest(ctx context.Context, registry, repo string, d digest.Digest) ([]byte, string, bool, error) {
	ms, err := s.manifests(ctx, registry, repo)
	if err != nil {
		return nil, "", false, err
	}
	m, err := ms.Get(ctx, d)
	if err != nil {
		var unknown distribution.ErrManifestUnknownRevision
		if errors.As(err, &unknown) || errors.Is(err, distribution.ErrBlobUnknown) {
			return nil, "", false, nil
		}
		var pnf storagedriver.PathNotFoundError
		if errors.As(err, &pnf) {
			return nil, "", false, nil
		}
		return nil, "", false, fmt.Errorf("get manifest %s: %w", d, err)
	}
	mt, b, err := m.Payload()
	if err != nil {
		return nil, "", false, fmt.Errorf("manifest %s payload: %w", d, err)
	}
	return b, mt, true, nil
}

// storedManifest is what putManifest stored: the storage repository's name
// and the digests the manifest references.
type storedManifest struct {
	repo string
	refs []digest.Digest
}

// putManifest stores manifest bytes, checking they hash to d.
func (s *store) putManifest(ctx context.Context, registry, repo string, d digest.Digest, mediaType string, b []byte) (storedManifest, error) {
	if d.Algorithm().FromBytes(b) != d {
		return storedManifest{}, fmt.Errorf("manifest %s: content does not match digest", d)
	}
	m, _, err := distribution.UnmarshalManifest(mediaType, b)
	if err != nil {
		return storedManifest{}, fmt.Errorf("parse manifest %s (%s): %w", d, mediaType, err)
	}
	named, err := storageName(registry, repo)
	if err != nil {
		return storedManifest{}, fmt.Errorf("storage name: %w", err)
	}
	ms, err := s.manifests(ctx, registry, repo)
	if err != nil {
		return storedManifest{}, err
	}
	if _, err := ms.Put(ctx, m); err != nil {
		return storedManifest{}, fmt.Errorf("put manifest %s: %w", d, err)
	}
	sm := storedManifest{repo: named.Name()}
	for _, r := range m.References() {
		sm.refs = append(sm.refs, r.Digest)
	}
	return sm, nil
}

// tagRecord is what the cache knows of a tag: where it pointed when last
// checked upstream, and when that was.
type tagRecord struct {
	Digest    digest.Digest `json:"digest"`
	MediaType string        `json:"mediaType,omitempty"`
	Size      int64         `json:"size,omitempty"`
	Validated time.Time     `json:"validated"`
}

func tagPath(registry, repo, tag string) string {
	return path.Join(tagRoot, strings.ReplaceAll(registry, ":", "-"), repo, tag)
}

func (s *store) getTag(ctx context.Context, registry, repo, tag string) (tagRecord, bool, error) {
	b, err := s.driver.GetContent(ctx, tagPath(registry, repo, tag))
	var pnf storagedriver.PathNotFoundError
	if errors.As(err, &pnf) {
		return tagRecord{}, false, nil
	}
	if err != nil {
		return tagRecord{}, false, fmt.Errorf("read tag record: %w", err)
	}
	var rec tagRecord
	if err := json.Unmarshal(b, &rec); err != nil || rec.Digest.Validate() != nil {
		return tagRecord{}, false, nil // a torn or foreign record is a miss, not an outage
	}
	return rec, true, nil
}

func (s *store) putTag(ctx context.Context, registry, repo, tag string, rec tagRecord) error {
	b, err := json.Marshal(rec)
	if err != nil {
		return err
	}
	if err := s.driver.PutContent(ctx, tagPath(registry, repo, tag), b); err != nil {
		return fmt.Errorf("write tag record: %w", err)
	}
	return nil
}

func (s *store) deleteTag(ctx context.Context, registry, repo, tag string) error {
	err := s.driver.Delete(ctx, tagPath(registry, repo, tag))
	var pnf storagedriver.PathNotFoundError
	if errors.As(err, &pnf) {
		return nil
	}
	return err
}
