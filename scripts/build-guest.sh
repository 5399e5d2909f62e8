#!/usr/bin/env bash
# Builds vmreplica's real test guest from Debian packages and caches it: a Debian 12 root file
# system (systemd, dbus, qemu-guest-agent, sqlite3, python3) on one ext4 disk without a partition
# table, its kernel and initramfs for a direct kernel boot, and a workload service whose
# databases and files carry gap-free, checksummed sequences (see docs/real-guest.md).
#
#   scripts/build-guest.sh [CACHE_DIR]     (root; prints the guest directory on stdout)
#
# The guest directory is CACHE_DIR/guest-v$VERSION (default CACHE_DIR: /var/cache/vmreplica-test,
# or $VMR_GUEST_CACHE): vmlinuz, initrd.img, root.qcow2, and "ready" written last. A directory
# with "ready" is reused as it is; bump VERSION when the guest's content changes.
# The package mirror is taken from this host's APT sources at run time.
set -euo pipefail

VERSION=2
cache=${1:-${VMR_GUEST_CACHE:-/var/cache/vmreplica-test}}
out=$cache/guest-v$VERSION
here=$(cd "$(dirname "$0")" && pwd)

if [ -f "$out/ready" ]; then
  echo "$out"
  exit 0
fi
[ "$(id -u)" -eq 0 ] || { echo "build-guest: needs root (debootstrap, chroot)" >&2; exit 1; }

need=()
command -v debootstrap >/dev/null 2>&1 || need+=(debootstrap)
command -v mkfs.ext4 >/dev/null 2>&1 || need+=(e2fsprogs)
if [ ${#need[@]} -gt 0 ]; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >&2
fi

mirror=
for f in /etc/apt/sources.list.d/debian.sources; do
  [ -f "$f" ] && mirror=$(sed -n 's/^URIs:[[:space:]]*\([^[:space:]]*\).*/\1/p' "$f" | grep -v security | head -n1)
done
if [ -z "$mirror" ] && [ -f /etc/apt/sources.list ]; then
  mirror=$(awk '$1=="deb" && $0 !~ /security/ {print $2; exit}' /etc/apt/sources.list)
fi
[ -n "$mirror" ] || { echo "build-guest: no Debian mirror in this host's APT sources" >&2; exit 1; }

mkdir -p "$cache"
work=$(mktemp -d "$cache/build.XXXXXX")
cleanup() {
  for m in proc sys dev; do umount -l "$work/root/$m" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

root=$work/root
pkgs=linux-image-amd64,initramfs-tools,systemd-sysv,dbus,qemu-guest-agent,sqlite3,e2fsprogs,udev,kmod,procps,python3,iproute2
echo "build-guest: debootstrap (bookworm) ..." >&2
debootstrap --variant=minbase --include="$pkgs" bookworm "$root" "$mirror" >"$work/debootstrap.log" 2>&1 || {
  tail -n 30 "$work/debootstrap.log" >&2
  exit 1
}

# Configuration: root on /dev/vda (no partition table), e2fsck in the initramfs, no timers or
# gettys that would write to the disk or the console behind the workload's back.
echo vmr-guest >"$root/etc/hostname"
printf '/dev/vda / ext4 defaults,errors=remount-ro 0 1\n' >"$root/etc/fstab"
mkdir -p "$root/etc/initramfs-tools/conf.d"
echo 'FSTYPE=ext4' >"$root/etc/initramfs-tools/conf.d/fstype"
mkdir -p "$root/etc/systemd/journald.conf.d"
printf '[Journal]\nStorage=volatile\n' >"$root/etc/systemd/journald.conf.d/volatile.conf"
install -m 0755 "$here/guest/vmr-workload" "$root/usr/local/bin/vmr-workload"
install -m 0644 "$here/guest/vmr-workload.service" "$root/etc/systemd/system/vmr-workload.service"
# App-consistent points: qemu-ga runs its fsfreeze hooks, and the workload's quiesces it.
install -m 0644 "$here/guest/qemu-ga.conf" "$root/etc/qemu/qemu-ga.conf"
mkdir -p "$root/etc/qemu/fsfreeze-hook.d"
install -m 0755 "$here/guest/fsfreeze-hook-vmr-workload" "$root/etc/qemu/fsfreeze-hook.d/vmr-workload"
mkdir -p "$root/etc/systemd/system/multi-user.target.wants"
ln -sf /etc/systemd/system/vmr-workload.service \
  "$root/etc/systemd/system/multi-user.target.wants/vmr-workload.service"
for u in serial-getty@ttyS0.service getty@tty1.service apt-daily.timer apt-daily-upgrade.timer \
  e2scrub_all.timer e2scrub_reap.service fstrim.timer systemd-tmpfiles-clean.timer; do
  ln -sf /dev/null "$root/etc/systemd/system/$u"
done

mount -t proc proc "$root/proc"
mount -t sysfs sys "$root/sys"
mount --bind /dev "$root/dev"
chroot "$root" update-initramfs -u -k all >"$work/initramfs.log" 2>&1 || {
  tail -n 30 "$work/initramfs.log" >&2
  exit 1
}
chroot "$root" apt-get clean
for m in proc sys dev; do umount -l "$root/$m"; done

cp "$root"/boot/vmlinuz-* "$work/vmlinuz"
cp "$root"/boot/initrd.img-* "$work/initrd.img"
truncate -s 4G "$work/root.raw"
mkfs.ext4 -q -L vmr-root -d "$root" "$work/root.raw"
qemu-img convert -O qcow2 "$work/root.raw" "$work/root.qcow2"
rm -f "$work/root.raw"

rm -rf "$out"
mkdir -p "$out"
mv "$work/vmlinuz" "$work/initrd.img" "$work/root.qcow2" "$out/"
chmod 0644 "$out"/*
sync -f "$out/root.qcow2"
echo "guest-v$VERSION $(date -u +%FT%TZ)" >"$out/ready"
echo "build-guest: ready in $out" >&2
echo "$out"
