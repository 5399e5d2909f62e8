#!/usr/bin/env bash
# The test command: installs missing QEMU tools, checks formatting and lints, runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo clippy -p vmr-store --all-targets --features failpoints --locked -- -D warnings
cargo test --workspace --locked -- --test-threads=2
# The store's crash tests and fault-injection tests need its test hooks (never in release builds).
cargo test -p vmr-store --features failpoints --locked -- --test-threads=2
