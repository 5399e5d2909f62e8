#!/usr/bin/env bash
# Installs what vmreplica's demo, tests and benchmarks need on a Debian machine, if missing:
# QEMU 10 tools (qemu-utils from bookworm-backports: qemu-img, qemu-io, qemu-nbd,
# qemu-storage-daemon), libvirt's C library and headers (libvirt-dev: the build links
# libvirt for vmr-libvirt), and optionally the libvirt daemon with its QEMU driver and virsh
# (libvirt 11 from bookworm-backports, without recommends and with no service started: the
# libvirt test runs a private daemon of its own; docs/libvirt.md), and optionally qemu-system-x86, rsync, jq (the test runner reads cargo's JSON), promtool and chromium (pass "full";
# promtool comes with Debian's prometheus package, installed without leaving its server running;
# Debian's headless-capable chromium loads the web dashboard in its browser test).
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
lv_need=()
command -v pkg-config >/dev/null 2>&1 || need+=(pkg-config)
pkg-config --exists libvirt 2>/dev/null || lv_need+=(libvirt-dev)
if [ "$want_full" = full ]; then
  # libvirt 11 or newer: bookworm's 9.0 does not know QEMU 10
  lv_major=$( (/usr/sbin/libvirtd --version 2>/dev/null || true) | sed -n 's/.* \([0-9]*\)\.[0-9.]*$/\1/p')
  [ "${lv_major:-0}" -ge 11 ] || lv_need+=(libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients)
  dpkg -s libvirt-daemon-driver-qemu >/dev/null 2>&1 || lv_need+=(libvirt-daemon-driver-qemu)
  command -v virsh >/dev/null 2>&1 || lv_need+=(libvirt-clients)
  command -v rsync >/dev/null 2>&1 || need+=(rsync)
  command -v jq >/dev/null 2>&1 || need+=(jq)
  command -v qemu-system-x86_64 >/dev/null 2>&1 || need+=(qemu-system-x86)
  command -v promtool >/dev/null 2>&1 || need+=(prometheus)
  command -v chromium >/dev/null 2>&1 || need+=(chromium)
fi
[ ${#need[@]} -eq 0 ] && [ ${#lv_need[@]} -eq 0 ] && exit 0

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
echo "vmreplica: installing ${need[*]} ${lv_need[*]}" >&2
$SUDO apt-get update -qq
# Only promtool is wanted from the prometheus package: no service of it may start (a
# policy-rc.d refusing every start while installing, the unit disabled and stopped after).
policy=/usr/sbin/policy-rc.d
made_policy=
if [[ " ${need[*]} " == *" prometheus "* ]] && [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
  $SUDO chmod 755 "$policy"
  made_policy=1
fi
if [ ${#need[@]} -gt 0 ]; then
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${target[@]}" "${need[@]}" >&2
fi
# libvirt 11 (which knows QEMU 10) from the same release as QEMU, without its recommends
# (storage, network and firewall tools the tests do not use). Its QEMU driver depends on a
# qemu-system package: from backports too, so QEMU 10 stays.
if [ ${#lv_need[@]} -gt 0 ]; then
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${target[@]}" "${lv_need[@]}" >&2
fi
[ -n "$made_policy" ] && $SUDO rm -f "$policy"
if [[ " ${need[*]} " == *" prometheus "* ]] && [ -d /run/systemd/system ]; then
  $SUDO systemctl disable --now prometheus prometheus-node-exporter >/dev/null 2>&1 || true
fi
qemu_ok || { echo "vmreplica: QEMU >= 10 tools still missing after install" >&2; exit 1; }
