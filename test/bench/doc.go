// Package bench holds shoal's benchmarks: the node tier against nginx, a peer
// hop against local serving, a cold containerd pull through a peer against a
// direct pull, the idle node's memory, and the cache tier against
// distribution's own proxy mode. Each benchmark runs its contenders side by
// side in interleaved rounds within one run and prints medians and ratios.
// Run them with test/bench/run.sh; plain `go test` runs nothing here.
package bench
