#!/usr/bin/env bash
# The test command: installs what the tests need when missing (QEMU tools, qemu-system-x86 for
# the real guest, promtool for the alert rules' test, chromium for the dashboard's browser test),
# checks formatting and lints, runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh full
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# Test hooks and failpoints (the agent's slowed resync, the store's crash pauses and fault
# injection) are compiled for the tests only, never into release builds.
cargo clippy --workspace --all-targets --locked --features vmreplica/test-hooks,vmr-store/failpoints -- -D warnings
# The tests run with a temp dir of their own, which must hold no `vmr-*` socket afterwards: a
# socket belongs in its agent's, store's or test's directory, also when a test SIGKILLs an
# agent (issue 12).
# The real test guest of the real-guest tests (docs/real-guest.md): built once, as root with
# network access (~3 min), then cached; without root a missing guest fails those tests.
if [ "$(id -u)" -eq 0 ]; then
  scripts/build-guest.sh >/dev/null
fi
run_tmp=$(mktemp -d)
trap 'rm -rf "$run_tmp"' EXIT
# Two test binaries at a time, each with two test threads (scripts/run-tests.sh): the
# end-to-end tests mostly wait on intervals and leases, so two lanes halve the wall time.
TMPDIR="$run_tmp" scripts/run-tests.sh --features vmreplica/test-hooks,vmr-store/failpoints
left=$(find "$run_tmp" -maxdepth 1 -name 'vmr-*' -type s)
if [ -n "$left" ]; then
    echo "test.sh: the tests left sockets in the temp dir:" >&2
    echo "$left" >&2
    exit 1
fi
# The quick fuzz pass (issue 11): every fuzz target for 3 s, where the nightly toolchain and
# cargo-fuzz are installed (`scripts/fuzz.sh 60` is the campaign; see RELIABILITY.md).
if cargo +nightly fuzz --version >/dev/null 2>&1; then
    # The fuzz workspace (not a member of the main one) is linted too.
    (cd fuzz && cargo +nightly clippy --all-targets --locked -- -D warnings)
    scripts/fuzz.sh 3
else
    echo "test.sh: quick fuzz pass skipped: needs nightly and cargo-fuzz (see RELIABILITY.md)"
fi
# The quick fault campaign (RELIABILITY.md): needs root for namespaces, iptables and tmpfs.
if [ "$(id -u)" -eq 0 ]; then
  scripts/faults.sh --quick
else
  echo "scripts/test.sh: not root: skipping the quick fault campaign (scripts/faults.sh --quick)" >&2
fi
