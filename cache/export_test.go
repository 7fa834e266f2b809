package cache

import (
	"context"

	"github.com/opencontainers/go-digest"
)

// SetMaxSizeForTest changes the size bound of c between eviction passes.
func SetMaxSizeForTest(c *Cache, n int64) error {
	c.evict.mu.Lock()
	defer c.evict.mu.Unlock()
	c.evict.max = n
	return nil
}

// HasBlobForTest reports whether blob d is in c's storage, without fetching it.
func HasBlobForTest(ctx context.Context, c *Cache, d digest.Digest) (bool, error) {
	_, ok, err := c.store.statBlob(ctx, d)
	return ok, err
}
