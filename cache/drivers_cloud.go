//go:build !nocloud

package cache

// The object-storage drivers. Their SDKs cost a node-only binary about 27 MiB
// of memory at start-up, so `-tags nocloud` leaves them out (the node image).
import (
	_ "github.com/distribution/distribution/v3/registry/storage/driver/azure"
	_ "github.com/distribution/distribution/v3/registry/storage/driver/gcs"
	_ "github.com/distribution/distribution/v3/registry/storage/driver/s3-aws"
)

const cloudDrivers = true
