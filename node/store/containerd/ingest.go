package containerd

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/opencontainers/go-digest"

	"github.com/shoal-oci/shoal/node/store"
)

// OpenIngest opens the data file of a blob that containerd is receiving
// into this store's namespace (an ingest of its content plugin), with the
// size containerd was told the blob has (0: not told). The file grows as
// containerd writes; containerd writes a blob in order, and on commit it
// renames the file into blobs/, which an open file survives.
//
// containerd's content API has no reader for an ingest in progress, so this
// reads the plugin's directory: ingest/<hash>/ holds "ref" (the namespaced
// ref "<namespace>/<n>/<ref>"; pulls name a blob's ref after its digest,
// e.g. "layer-sha256:..."), "data" and "total". When there is no ingest but
// containerd has committed the blob, it opens the blob's file (which an
// image record may not reference yet: containerd writes the record after
// the last blob of a pull). It returns store.ErrNotFound when there is
// neither, or no content directory.
func (s *Store) OpenIngest(_ context.Context, d digest.Digest) (*os.File, int64, error) {
	if s.contentDir == "" {
		return nil, 0, store.ErrNotFound
	}
	root := filepath.Join(s.contentDir, "ingest")
	entries, err := os.ReadDir(root)
	if err != nil {
		if os.IsNotExist(err) {
			return nil, 0, store.ErrNotFound
		}
		return nil, 0, fmt.Errorf("read ingests: %w", err)
	}
	var (
		best      *os.File
		bestTotal int64
		bestSize  int64 = -1
	)
	for _, e := range entries {
		dir := filepath.Join(root, e.Name())
		ref, err := os.ReadFile(filepath.Join(dir, "ref"))
		if err != nil || !strings.HasPrefix(string(ref), s.ns+"/") || !strings.HasSuffix(string(ref), d.String()) {
			continue
		}
		f, err := os.Open(filepath.Join(dir, "data"))
		if err != nil {
			continue // committed or aborted meanwhile
		}
		fi, err := f.Stat()
		if err != nil || fi.Size() <= bestSize {
			f.Close()
			continue
		}
		if best != nil {
			best.Close()
		}
		best, bestSize = f, fi.Size()
		bestTotal = 0
		if b, err := os.ReadFile(filepath.Join(dir, "total")); err == nil {
			bestTotal, _ = strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
		}
	}
	if best == nil {
		return s.openCommitted(d)
	}
	return best, bestTotal, nil
}

// openCommitted opens d's blob file in the content directory, with its size.
func (s *Store) openCommitted(d digest.Digest) (*os.File, int64, error) {
	if d.Validate() != nil {
		return nil, 0, store.ErrNotFound
	}
	f, err := os.Open(filepath.Join(s.contentDir, "blobs", d.Algorithm().String(), d.Encoded()))
	if err != nil {
		return nil, 0, store.ErrNotFound
	}
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, 0, fmt.Errorf("stat blob %s: %w", d, err)
	}
	return f, fi.Size(), nil
}
