#!/usr/bin/env bash
# Runs `vmreplica demo` (installs missing QEMU tools first).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
exec cargo run --release --locked -p vmreplica -- demo "$@"
