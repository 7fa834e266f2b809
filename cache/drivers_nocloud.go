//go:build nocloud

package cache

const cloudDrivers = false
