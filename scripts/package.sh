#!/usr/bin/env bash
# Builds the Debian package of vmreplica: target/debian/vmreplica_<version>_<arch>.deb.
#
#   scripts/package.sh [--no-build]
#
# It builds `cargo build --release -p vmreplica` (skipped with --no-build: the existing
# target/release/vmreplica is packaged), generates the man pages and shell completions from the
# CLI grammar (`vmreplica generate-docs`, hidden), and assembles the package with
# `dpkg-deb --build --root-owner-group` (no root needed). Contents:
#   /usr/bin/vmreplica                                  (stripped)
#   /lib/systemd/system/vmreplica.service               (packaging/vmreplica.service)
#   /usr/share/man/man1/vmreplica*.1.gz                 (one page per command)
#   /usr/share/bash-completion/completions/vmreplica, /usr/share/zsh/vendor-completions/_vmreplica,
#   /usr/share/fish/vendor_completions.d/vmreplica.fish
#   /usr/share/doc/vmreplica/{README.md.gz,copyright,changelog.Debian.gz,examples/}
#   /usr/share/vmreplica/monitoring/{prometheus-rules.yml,grafana-dashboard.json,zabbix-template.yaml}
#   /usr/share/lintian/overrides/vmreplica
# and postinst makes /var/lib/vmreplica (mode 0700, root) when it does not exist.
# Maintainer scripts: packaging/debian/{postinst,prerm,postrm}. Environment:
#   DEB_REVISION (default 1): the Debian revision after the upstream version;
#   DEBFULLNAME, DEBEMAIL: the maintainer (default: the author of the last commit).
# Prints the path of the .deb on stdout. Tested by scripts/package-test.sh.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"

build=1
for a in "$@"; do
  case "$a" in
    --no-build) build=0 ;;
    *) echo "usage: $0 [--no-build]" >&2; exit 2 ;;
  esac
done

for tool in dpkg-deb dpkg-shlibdeps strip gzip; do
  command -v "$tool" >/dev/null 2>&1 || { echo "package.sh: $tool is missing (apt-get install dpkg-dev binutils gzip)" >&2; exit 1; }
done

target_dir=${CARGO_TARGET_DIR:-$repo/target}
bin=$target_dir/release/vmreplica
if [ "$build" = 1 ]; then
  echo "package.sh: cargo build --release -p vmreplica" >&2
  cargo build --release --locked -p vmreplica >&2
fi
[ -x "$bin" ] || { echo "package.sh: $bin does not exist (run without --no-build)" >&2; exit 1; }

upstream=$("$bin" --version | awk '{print $2}')
version="$upstream-${DEB_REVISION:-1}"
arch=$(dpkg --print-architecture)
commit=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
maintainer="${DEBFULLNAME:-$(git log -1 --format=%an 2>/dev/null || echo vmreplica)} <${DEBEMAIL:-$(git log -1 --format=%ae 2>/dev/null || echo root@localhost)}>"
# The changelog's date is the last commit's (the same tree gives the same package).
date_rfc2822=$(git log -1 --format=%aD 2>/dev/null || date -R)
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}

out=$target_dir/debian
root=$out/vmreplica_${version}_${arch}
rm -rf "$root"
mkdir -p "$root"
umask 022

# The program.
install -D -m 0755 "$bin" "$root/usr/bin/vmreplica"
strip --strip-unneeded --remove-section=.comment --remove-section=.note "$root/usr/bin/vmreplica"

# The unit. The agent directory /var/lib/vmreplica (0700, root) is made by postinst.
install -D -m 0644 packaging/vmreplica.service "$root/lib/systemd/system/vmreplica.service"

# Man pages and completions, generated from the CLI grammar by the binary being packaged.
gen=$(mktemp -d)
trap 'rm -rf "$gen"' EXIT
"$bin" generate-docs --out "$gen" >/dev/null
install -d -m 0755 "$root/usr/share/man/man1"
for page in "$gen"/man/*.1; do
  gzip -9n -c "$page" >"$root/usr/share/man/man1/$(basename "$page").gz"
  chmod 0644 "$root/usr/share/man/man1/$(basename "$page").gz"
done
install -D -m 0644 "$gen/completions/bash-completion/completions/vmreplica.bash" \
  "$root/usr/share/bash-completion/completions/vmreplica"
install -D -m 0644 "$gen/completions/zsh/vendor-completions/_vmreplica" \
  "$root/usr/share/zsh/vendor-completions/_vmreplica"
install -D -m 0644 "$gen/completions/fish/vendor_completions.d/vmreplica.fish" \
  "$root/usr/share/fish/vendor_completions.d/vmreplica.fish"

# Documentation.
doc=$root/usr/share/doc/vmreplica
install -d -m 0755 "$doc/examples"
gzip -9n -c README.md >"$doc/README.md.gz"
install -m 0644 examples/*.toml "$doc/examples/"
sed -e "s|@MAINTAINER@|$maintainer|" -e "s|@SOURCE@|the vmreplica git repository, commit $commit|" \
  packaging/debian/copyright >"$doc/copyright"
{
  echo "vmreplica ($version) unstable; urgency=medium"
  echo
  echo "  * Built by scripts/package.sh from commit $commit."
  echo
  echo " -- $maintainer  $date_rfc2822"
} | gzip -9n >"$doc/changelog.Debian.gz"
find "$doc" -type f -exec chmod 0644 {} +
# Monitoring integrations (docs/monitoring.md).
install -d -m 0755 "$root/usr/share/vmreplica/monitoring"
install -m 0644 packaging/monitoring/* "$root/usr/share/vmreplica/monitoring/"
# Not an upload to the Debian archive: no bug to close.
install -d -m 0755 "$root/usr/share/lintian/overrides"
echo "vmreplica: initial-upload-closes-no-bugs" >"$root/usr/share/lintian/overrides/vmreplica"
chmod 0644 "$root/usr/share/lintian/overrides/vmreplica"

# Control files. libc6's minimum version from the binary's symbols (dpkg-shlibdeps wants a
# debian/control in its working directory); qemu-utils 10 gives qemu-img, qemu-nbd and
# qemu-storage-daemon (bookworm-backports on Debian 12).
shl=$(mktemp -d)
mkdir -p "$shl/debian"
printf 'Source: vmreplica\n\nPackage: vmreplica\nArchitecture: any\n' >"$shl/debian/control"
shlibs=$(cd "$shl" && dpkg-shlibdeps -O "$root/usr/bin/vmreplica" 2>/dev/null | sed -n 's/^shlibs:Depends=//p')
rm -rf "$shl"
[ -n "$shlibs" ] || { echo "package.sh: dpkg-shlibdeps found no library dependencies" >&2; exit 1; }
depends="$shlibs, qemu-utils (>= 1:10.0)"
install -d -m 0755 "$root/DEBIAN"
installed_size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
sed -e "s|@VERSION@|$version|" -e "s|@ARCH@|$arch|" -e "s|@MAINTAINER@|$maintainer|" \
  -e "s|@INSTALLED_SIZE@|$installed_size|" -e "s|@DEPENDS@|$depends|" \
  packaging/debian/control.in >"$root/DEBIAN/control"
for s in postinst prerm postrm; do
  install -m 0755 "packaging/debian/$s" "$root/DEBIAN/$s"
done
(cd "$root" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | sort -z | xargs -0 md5sum) >"$root/DEBIAN/md5sums"
chmod 0644 "$root/DEBIAN/control" "$root/DEBIAN/md5sums"
# Every file and directory dated by the last commit (a reproducible archive).
find "$root" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +

deb=$out/vmreplica_${version}_${arch}.deb
dpkg-deb --root-owner-group -Zxz --build "$root" "$deb" >&2
echo "package.sh: $(du -h "$deb" | cut -f1) $deb" >&2
echo "$deb"
