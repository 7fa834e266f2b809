#!/usr/bin/env bash
# Runs every parser's fuzz target for a fixed number of executions
# (default 10,000,000 each) and prints one line per target with the count
# and the time taken. docs/fuzzing.md records what it printed.
# Usage: test/fuzz.sh [executions [target-name-regexp]]   (FUZZ_PARALLEL workers, default 1)
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-10000000}
only=${2:-.}
targets=(
  "./oci FuzzParsePath"
  "./oci FuzzParseRange"
  "./upstream/budget FuzzParseRateLimit"
  "./auth FuzzParseDockerConfig"
  "./auth FuzzParsePSK"
  "./node/mirror FuzzParseHostsFile"
  "./node FuzzPeerResponse"
  "./node/routing/dht/wire FuzzDecode"
)
for t in "${targets[@]}"; do
  set -- $t
  pkg=$1 fn=$2
  [[ $fn =~ $only ]] || continue
  start=$(date +%s)
  out=$(go test -run "^$" -fuzz "^$fn\$" -fuzztime "${n}x" -parallel "${FUZZ_PARALLEL:-1}" -timeout 0 "$pkg" 2>&1) || { echo "$out"; echo "FAIL $pkg $fn"; exit 1; }
  execs=$(grep -o 'execs: [0-9]*' <<<"$out" | tail -1 | awk '{print $2}')
  echo "$pkg $fn: ${execs:-?} executions in $(( $(date +%s) - start ))s, no failure"
done
