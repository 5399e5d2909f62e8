#!/usr/bin/env bash
# The full form of the real-guest tests (crates/vmreplica/tests/real_guest.rs, docs/real-guest.md):
# every scenario, also those the test command leaves out (#[ignore]), one at a time (each boots
# TCG guests: 25-85 s a boot on 2 cores). Extra arguments go to the test binary (e.g. a test name).
#
#   scripts/real-guest.sh [TEST-NAME-FILTER]     (root the first time: builds the guest cache)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/build-guest.sh >/dev/null
exec cargo test -p vmreplica --locked --features vmreplica/test-hooks,vmr-store/failpoints \
  --test real_guest -- --include-ignored --test-threads=1 --nocapture "$@"
