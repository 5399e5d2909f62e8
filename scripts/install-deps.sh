#!/usr/bin/env bash
# Installs what vmreplica's demo, tests and benchmarks need on a Debian machine, if missing:
# QEMU 10 tools (qemu-utils from bookworm-backports: qemu-img, qemu-io, qemu-nbd,
# qemu-storage-daemon), and optionally qemu-system-x86 and rsync (pass "full").
# Idempotent; does nothing when everything is present.
set -euo pipefail

want_full=${1:-}
need=()
qemu_ok() {
  command -v qemu-storage-daemon >/dev/null 2>&1 || return 1
  local v
  v=$(qemu-img --version | sed -n 's/^qemu-img version \([0-9]*\)\..*/\1/p')
  [ "${v:-0}" -ge 10 ]
}
qemu_ok || need+=(qemu-utils)
if [ "$want_full" = full ]; then
  command -v rsync >/dev/null 2>&1 || need+=(rsync)
  command -v qemu-system-x86_64 >/dev/null 2>&1 || need+=(qemu-system-x86)
fi
[ ${#need[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
src=/etc/apt/sources.list.d/debian.sources
codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
target=()
if [ "$codename" = bookworm ]; then
  # QEMU 10 comes from bookworm-backports. A plain install of qemu-system-x86 would pull QEMU 7.2
  # and remove qemu-utils 10, so everything QEMU is installed from backports.
  if [ -f "$src" ] && ! grep -q 'bookworm-backports' "$src"; then
    $SUDO sed -i 's/^Suites: bookworm bookworm-updates$/Suites: bookworm bookworm-updates bookworm-backports/' "$src"
  fi
  target=(-t bookworm-backports)
fi
echo "vmreplica: installing ${need[*]}" >&2
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${target[@]}" "${need[@]}" >&2
qemu_ok || { echo "vmreplica: QEMU >= 10 tools still missing after install" >&2; exit 1; }
