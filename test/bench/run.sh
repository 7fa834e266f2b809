#!/usr/bin/env bash
# Runs shoal's benchmarks side by side and prints the RESULT lines (figures,
# ratio, target, PASS/FAIL). It builds shoal once and needs root for
# containerd; nginx comes from Debian (apt-get install nginx-light).
#
#   test/bench/run.sh                 # everything
#   test/bench/run.sh NodeBlob        # a -bench regexp
#
# Knobs (environment): SHOAL_BENCH_ROUNDS (5), SHOAL_BENCH_BLOB_MIB (1024),
# SHOAL_BENCH_PULL_LAYER_MIB (16), SHOAL_BENCH_RELAY_MIB (256),
# SHOAL_BENCH_TTFB_ROUNDS (5), SHOAL_BENCH_SETTLE_S (15).
set -euo pipefail
cd "$(dirname "$0")/../.."
if [[ -f /tmp/install.env ]]; then source /tmp/install.env; fi
if [[ -z ${SHOAL_CONTAINERD_BIN:-} && -x test/install.sh ]]; then
	eval "$(test/install.sh)" || echo "[bench] test/install.sh failed; benchmarks that need containerd will skip" >&2
fi
out=$(mktemp -d /tmp/shoal-bench-XXXXXX)
trap 'rm -rf "$out"' EXIT
echo "[bench] go build shoal" >&2
# The builds the image ships (see the Dockerfile): /shoal for the cache tier
# and /shoal-node (no object-storage SDKs, no cache tier) for the nodes.
go build -o "$out/shoal" .
go build -tags nocloud,nocache -o "$out/shoal-node" .
export SHOAL_BENCH_BIN="$out/shoal" SHOAL_BENCH_NODE_BIN="$out/shoal-node"
pattern=${1:-.}
echo "[bench] machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), load $(cut -d' ' -f1-3 /proc/loadavg)" >&2
go test -run '^$' -bench "$pattern" -benchtime 1x -timeout 60m ./test/bench/ | tee "$out/bench.log"
echo
echo "=== results ==="
grep '^RESULT' "$out/bench.log" || true
if grep -q -- '--- SKIP' "$out/bench.log"; then
	echo "(some benchmarks were skipped:)"
	grep -A2 -- '--- SKIP' "$out/bench.log" || true
fi
