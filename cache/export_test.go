package cache

import (
	"context"
	"time"

	"github.com/opencontainers/go-digest"
)

// SetMaxSizeForTest changes the size bound of c between eviction passes.
func SetMaxSizeForTest(c *Cache, n int64) error {
	c.evict.mu.Lock()
	defer c.evict.mu.Unlock()
	c.evict.max = n
	return nil
}

// DrainForTest waits until c's flight runs no fetch: every commit, and the
// use it records, is done.
func DrainForTest(ctx context.Context, c *Cache) error { return c.drainFlight(ctx) }

// HasBlobForTest reports whether blob d is in c's storage, without fetching it.
func HasBlobForTest(ctx context.Context, c *Cache, d digest.Digest) (bool, error) {
	_, ok, err := c.store.statBlob(ctx, d)
	return ok, err
}

// StartUploadForTest begins a blob upload in c's storage and abandons it, as
// a replica killed mid-commit would.
func StartUploadForTest(ctx context.Context, c *Cache) error {
	w, err := c.store.blobs.Create(ctx)
	if err != nil {
		return err
	}
	_, err = w.Write([]byte("half a blob"))
	return err
}

// UploadsForTest counts the unfinished uploads in c's storage.
func UploadsForTest(ctx context.Context, c *Cache) (int, error) {
	list, err := c.cfg.Driver.List(ctx, "/docker/registry/v2/repositories/"+blobRepo+"/_uploads")
	if isPathNotFound(err) {
		return 0, nil
	}
	return len(list), err
}

// PurgeUploadsBeforeForTest purges unfinished uploads started before t.
func PurgeUploadsBeforeForTest(ctx context.Context, c *Cache, t time.Time) {
	c.purgeUploadsBefore(ctx, t)
}
