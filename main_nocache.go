//go:build nocache

package main

import (
	"errors"
	"io"
)

// runCache is not in this build: the node image's binary is built with
// -tags nocache (see main_cache.go).
func runCache(_ []string, _ io.Writer) error {
	return errors.New("this build of shoal has no cache tier (built with -tags nocache); use the full shoal binary")
}
