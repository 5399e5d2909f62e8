#!/usr/bin/env bash
# The test command: installs missing QEMU tools, checks formatting and lints, runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked --no-fail-fast --features vmreplica/test-hooks -- --test-threads=2
