#!/usr/bin/env bash
# Runs every test binary of the workspace, two binaries at a time (each with two test threads),
# as `cargo test --workspace --no-fail-fast` would one after another: most end-to-end tests
# spend their time waiting for intervals, leases and timeouts, so two lanes halve the wall time
# on two cores. Each binary runs in its package's directory (as cargo runs it); its output is
# printed whole when it ends; every binary runs even when one fails, and the failed ones are
# listed at the end (exit 1).
#
#   scripts/run-tests.sh [cargo test options...]    e.g. --features vmreplica/test-hooks
#
# The lanes are filled longest first (LONG below: the binaries that took over a minute in the
# last runs), so that no long binary starts last.
set -euo pipefail
cd "$(dirname "$0")/.."

LANES=${VMR_TEST_LANES:-2}
LONG=(real_guest extended fanout libvirt partitions bandwidth auto_failover replication faults resync failover)

work=$(mktemp -d "${TMPDIR:-/tmp}/run-tests.XXXXXX")
trap 'rm -rf "$work"' EXIT

# Build every test binary; cargo's JSON messages name each one with its package's manifest.
cargo test --workspace --locked --no-run --message-format=json-render-diagnostics "$@" \
  | jq -r 'select(.reason == "compiler-artifact" and .profile.test == true and .executable != null)
           | "\(.target.name)\t\(.manifest_path | rtrimstr("/Cargo.toml"))\t\(.executable)"' \
  > "$work/all"

# VMR_TEST_ONLY="name ..." keeps those binaries only (by target name, e.g. `vmr_core fanout`).
if [ -n "${VMR_TEST_ONLY:-}" ]; then
  awk -F'\t' -v only=" $VMR_TEST_ONLY " 'index(only, " " $1 " ") > 0' "$work/all" > "$work/some"
  mv "$work/some" "$work/all"
fi

# Longest first, then the rest in cargo's order.
: > "$work/order"
for name in "${LONG[@]}"; do
  awk -F'\t' -v n="$name" '$1 == n' "$work/all" >> "$work/order"
done
awk -F'\t' 'FILENAME == ARGV[1] { seen[$3] = 1; next } !($3 in seen)' "$work/order" "$work/all" > "$work/rest"
cat "$work/rest" >> "$work/order"

run_one() {
  local name=$1 dir=$2 exe=$3 work=$4
  local log="$work/$(basename "$exe").log" start end rc=0
  start=$(date +%s)
  (cd "$dir" && "$exe" --test-threads=2) > "$log" 2>&1 || rc=$?
  end=$(date +%s)
  {
    echo "     Running $name ($exe) in $dir: $((end - start)) s, exit $rc"
    cat "$log"
  } | flock "$work/print" cat
  if [ "$rc" -ne 0 ]; then
    echo "$name ($exe): exit $rc" >> "$work/failed"
  fi
}
export -f run_one

# xargs puts "$work" first, then one binary's name, directory and path.
tr '\t' '\n' < "$work/order" \
  | xargs -r -d '\n' -n 3 -P "$LANES" bash -c 'run_one "$2" "$3" "$4" "$1"' _ "$work"

# The documentation examples, as `cargo test` runs them after the binaries.
cargo test --workspace --locked --doc "$@" || echo "doc tests: failed" >> "$work/failed"

if [ -s "$work/failed" ]; then
  echo "run-tests.sh: FAILED:" >&2
  cat "$work/failed" >&2
  exit 1
fi
echo "run-tests.sh: every test binary passed"
