#!/usr/bin/env bash
# The fault campaign (RELIABILITY.md, "Fault campaign"): real agents, stand-in VMs and guest
# writers under SIGKILLs, network faults in namespaces, full disks and a second agent.
# Needs root (network namespaces, iptables, tmpfs mounts). Arguments go to vmr-faults:
#   scripts/faults.sh --write     the full campaign, kept in RELIABILITY.md
#   scripts/faults.sh --quick     the CI form (2 trials of faults 1, 2, 4, 6; 1 of 3a, 3b, 5)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
if ! command -v iptables >/dev/null 2>&1; then
  if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
  echo "vmreplica: installing iptables (fault 3)" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq iptables >&2
fi
exec cargo run --locked -q -p vmr-faults -- "$@"
