#!/usr/bin/env bash
# Tests the Debian package in a clean Debian bookworm chroot (root; network; a few minutes).
#
#   sudo scripts/package-test.sh [--no-build]
#
# 1. Builds the package (scripts/package.sh; --no-build packages the existing release binary).
# 2. Makes a pristine bookworm chroot with debootstrap (installed when missing), cached as a
#    tarball in ${XDG_CACHE_HOME:-$HOME/.cache}/vmreplica/, and unpacks a copy under /var/tmp.
#    The mirror and the apt sources are the host's (/etc/apt/sources.list.d/debian.sources).
# 3. Inside it, as README.md "Deploy" says: qemu-utils 10 from bookworm-backports, then
#    `apt install ./vmreplica_*.deb`; then checks files, modes, enablement, man pages
#    (`man -w`), completions, docs and `systemd-analyze verify` of the unit.
# 4. `vmreplica init`, then starts the agent exactly as the installed unit's ExecStart says
#    (no systemd runs in a chroot), checks that `vmreplica status` answers over its socket,
#    stops it with the unit's KillSignal and checks that nothing it started is left.
# 5. `apt remove` (the unit is gone, its enablement masked), `apt purge` (nothing of the unit
#    left; /var/lib/vmreplica kept).
# Also runs lintian on the package when it is installed. Prints the time of each phase. Everything it mounts or starts is undone on exit, also on
# failure and Ctrl-C. Not part of scripts/test.sh (network and minutes).
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
[ "$(id -u)" -eq 0 ] || { echo "package-test.sh: run as root (debootstrap, chroot, mounts)" >&2; exit 2; }

t_start=$(date +%s)
t_phase=$t_start
timings=()
phase() {
  local now
  now=$(date +%s)
  timings+=("$(printf '%-44s %4d s' "$1" $((now - t_phase)))")
  t_phase=$now
}
say() { echo "package-test: $*" >&2; }
fail() { echo "package-test: FAIL: $*" >&2; exit 1; }

# --- 1. the package -------------------------------------------------------------------------
deb=$("$repo/scripts/package.sh" "$@")
[ -f "$deb" ] || fail "package.sh printed no package"
if command -v lintian >/dev/null 2>&1; then
  lintian --fail-on error,warning "$deb" 2>&1 | grep -v 'running with root privileges' >&2 || true
  lintian --fail-on error,warning "$deb" >/dev/null 2>&1 || fail "lintian reports errors or warnings"
  say "lintian: no errors or warnings"
else
  say "lintian is not installed: not run"
fi
phase "build the package (scripts/package.sh $*), lintian"

# --- 2. the pristine chroot -----------------------------------------------------------------
sources=/etc/apt/sources.list.d/debian.sources
[ -f "$sources" ] || fail "$sources is missing: the mirror is taken from the host's apt sources"
# The first URI of the host's stanza that carries bookworm (never a host name in this script).
mirror=$(awk '/^URIs:/ {u=$2} /^Suites:/ && / bookworm( |$)/ {print u; exit}' "$sources")
[ -n "$mirror" ] || fail "no URIs: for bookworm in $sources"
keyring=$(awk '/^Signed-By:/ {print $2; exit}' "$sources")
keyring=${keyring:-/usr/share/keyrings/debian-archive-keyring.gpg}
arch=$(dpkg --print-architecture)
cache=${XDG_CACHE_HOME:-$HOME/.cache}/vmreplica
tarball=$cache/bookworm-$arch-pristine.tar.gz
command -v debootstrap >/dev/null 2>&1 || {
  say "installing debootstrap"
  apt-get install -y -qq debootstrap >&2
}

work=$(mktemp -d /var/tmp/vmr-pkgtest.XXXXXX)
ch=$work/root
agent_pid=
cleanup() {
  local rc=$?
  set +e
  if [ -n "$agent_pid" ] && kill -0 "$agent_pid" 2>/dev/null; then kill -KILL "$agent_pid"; fi
  # Any process whose root is the chroot (the agent's helpers if something went wrong).
  for p in /proc/[0-9]*; do
    [ "$(readlink "$p/root" 2>/dev/null)" = "$ch" ] && kill -KILL "${p#/proc/}" 2>/dev/null
  done
  for m in dev/pts dev proc sys run; do
    mountpoint -q "$ch/$m" 2>/dev/null && umount -l "$ch/$m"
  done
  # Only remove the tree when nothing is mounted below it any more.
  if ! grep -q " $work" /proc/mounts; then rm -rf "$work"; else say "left $work (still mounted)"; fi
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

mkdir -p "$ch"
if [ ! -f "$tarball" ]; then
  say "debootstrap bookworm from $mirror (cached in $tarball)"
  mkdir -p "$cache"
  debootstrap --variant=minbase --keyring="$keyring" --include=systemd,systemd-sysv,man-db \
    bookworm "$ch" "$mirror" >"$work/debootstrap.log" 2>&1 || { tail -20 "$work/debootstrap.log" >&2; fail "debootstrap"; }
  rm -f "$ch/etc/apt/sources.list"
  cp "$sources" "$ch/etc/apt/sources.list.d/debian.sources"
  tar -C "$ch" -czf "$tarball.tmp" . && mv "$tarball.tmp" "$tarball"
  phase "debootstrap the pristine chroot (cached)"
else
  tar -C "$ch" -xzf "$tarball"
  phase "unpack the cached pristine chroot"
fi

mount -t proc proc "$ch/proc"
mount -t sysfs sysfs "$ch/sys"
mount --bind /dev "$ch/dev"
mount --bind /dev/pts "$ch/dev/pts"
mount -t tmpfs tmpfs "$ch/run"
cp /etc/resolv.conf "$ch/etc/resolv.conf"
in_ch() { chroot "$ch" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive "$@"; }

# --- 3. install -------------------------------------------------------------------------------
[ ! -d "$ch/run/systemd/system" ] || fail "systemd appears to run in the chroot"
# As README.md, "Deploy", says (the chroot has the host's sources, with bookworm-backports).
grep -q 'bookworm-backports' "$ch/etc/apt/sources.list.d/debian.sources" ||
  sed -i 's/^Suites: bookworm bookworm-updates$/Suites: bookworm bookworm-updates bookworm-backports/' "$ch/etc/apt/sources.list.d/debian.sources"
in_ch sh -c 'apt-get update -qq && apt-get install -y -t bookworm-backports qemu-utils' >"$work/qemu-install.log" 2>&1 ||
  { tail -20 "$work/qemu-install.log" >&2; fail "apt install -t bookworm-backports qemu-utils in the chroot"; }
in_ch qemu-img --version | head -1 >&2
phase "apt install -t bookworm-backports qemu-utils"

cp "$deb" "$ch/tmp/"
debname=$(basename "$deb")
in_ch sh -c "cd /tmp && apt-get install -y ./$debname" >"$work/apt-install.log" 2>&1 || { cat "$work/apt-install.log" >&2; fail "apt install ./$debname"; }
grep -q "vmreplica: run 'vmreplica init" "$work/apt-install.log" || fail "postinst did not say to run vmreplica init"
phase "apt install ./$debname"

unit=$ch/lib/systemd/system/vmreplica.service
[ -x "$ch/usr/bin/vmreplica" ] || fail "/usr/bin/vmreplica missing"
[ -f "$unit" ] || fail "the unit is missing"
[ "$(stat -c '%a %U %G' "$ch/var/lib/vmreplica")" = "700 root root" ] || fail "/var/lib/vmreplica is $(stat -c '%a %U %G' "$ch/var/lib/vmreplica")"
[ -L "$ch/etc/systemd/system/multi-user.target.wants/vmreplica.service" ] || fail "the unit is not enabled on install"
page=$(in_ch man -w vmreplica) || fail "man -w vmreplica"
[ "$page" = /usr/share/man/man1/vmreplica.1.gz ] || fail "man -w vmreplica: $page"
for sub in vmreplica-init vmreplica-agent vmreplica-enable vmreplica-failover-start vmreplica-server-allow; do
  in_ch man -w "$sub" >/dev/null || fail "man -w $sub"
done
in_ch sh -c 'MANPAGER=cat MANWIDTH=100 man vmreplica 2>/dev/null' | grep -q "EXIT STATUS" || fail "vmreplica(1) has no EXIT STATUS"
[ -z "$(find "$ch/usr/share/man/man1" -name 'vmreplica*generate-docs*')" ] || fail "a man page for the hidden generate-docs"
pages=$(find "$ch/usr/share/man/man1" -name 'vmreplica*.1.gz' | wc -l)
in_ch bash -c '. /usr/share/bash-completion/completions/vmreplica && complete -p vmreplica' >/dev/null || fail "bash completion does not load"
for f in /usr/share/zsh/vendor-completions/_vmreplica /usr/share/fish/vendor_completions.d/vmreplica.fish \
  /usr/share/doc/vmreplica/copyright /usr/share/doc/vmreplica/changelog.Debian.gz /usr/share/doc/vmreplica/README.md.gz \
  /usr/share/vmreplica/monitoring/prometheus-rules.yml /usr/share/vmreplica/monitoring/grafana-dashboard.json \
  /usr/share/vmreplica/monitoring/zabbix-template.yaml; do
  [ -f "$ch$f" ] || fail "$f missing"
done
in_ch vmreplica --version >/dev/null || fail "vmreplica --version"
in_ch systemd-analyze verify /lib/systemd/system/vmreplica.service >"$work/verify.log" 2>&1 || { cat "$work/verify.log" >&2; fail "systemd-analyze verify in the chroot"; }
if command -v systemd-analyze >/dev/null 2>&1; then
  # On the host too, against the chroot's files (the unit's ExecStart and man page are there).
  # Its man: check runs the host's man, which does not look into the chroot: only that may fail.
  systemd-analyze verify --root="$ch" /lib/systemd/system/vmreplica.service >"$work/verify-host.log" 2>&1 || true
  grep -v "Command 'man vmreplica(1)' failed" "$work/verify-host.log" >&2 && fail "host's systemd-analyze verify --root"
  exposure=$(systemd-analyze security --offline=yes --root="$ch" /lib/systemd/system/vmreplica.service 2>/dev/null | tail -1 || true)
  say "systemd-analyze security: ${exposure:-n/a}"
fi
say "installed: $pages man pages, $(du -sh "$ch/usr/bin/vmreplica" | cut -f1) binary"
phase "check files, modes, man pages, completions"

# --- 4. init and run the agent as the unit does -------------------------------------------------
condition=$(sed -n 's/^ConditionPathExists=//p' "$unit")
[ -n "$condition" ] || fail "the unit has no ConditionPathExists"
[ ! -e "$ch$condition" ] || fail "$condition exists before init"
port=$((20000 + $$ % 20000))
in_ch vmreplica init --name pkgtest --listen "127.0.0.1:$port" >"$work/init.out" || fail "vmreplica init"
grep -q '^SHA256:' "$work/init.out" || fail "init printed no fingerprint: $(cat "$work/init.out")"
[ -e "$ch$condition" ] || fail "the unit's condition $condition is not met after init"
[ "$(stat -c %a "$ch/var/lib/vmreplica/agent.key")" = 600 ] || fail "agent.key is not 0600"
[ "$(stat -c %a "$ch/var/lib/vmreplica")" = 700 ] || fail "init changed the directory's mode"
execstart=$(sed -n 's/^ExecStart=//p' "$unit")
envs=$(sed -n 's/^Environment=//p' "$unit" | tr '\n' ' ')
killsig=$(sed -n 's/^KillSignal=SIG//p' "$unit")
say "ExecStart: $execstart (environment: $envs)"
# shellcheck disable=SC2086 # the unit's words
chroot "$ch" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin $envs $execstart >"$work/agent.log" 2>&1 &
agent_pid=$!
ok=
for _ in $(seq 1 150); do
  if in_ch vmreplica status --json >"$work/status.json" 2>"$work/status.err"; then ok=1; break; fi
  kill -0 "$agent_pid" 2>/dev/null || { cat "$work/agent.log" >&2; fail "the agent exited"; }
  sleep 0.2
done
[ -n "$ok" ] || { cat "$work/status.err" "$work/agent.log" >&2; fail "vmreplica status did not answer"; }
[ "$(tr -d ' \n' <"$work/status.json")" = "[]" ] || fail "status: $(cat "$work/status.json")"
[ -S "$ch/var/lib/vmreplica/agent.sock" ] || fail "no control socket"
in_ch vmreplica server show >/dev/null || fail "vmreplica server show"
phase "init, start the agent as ExecStart, status answers"

kill -"${killsig:-TERM}" "$agent_pid"
rc=0
wait "$agent_pid" || rc=$?
agent_pid=
[ "$rc" = 0 ] || { cat "$work/agent.log" >&2; fail "the agent exited with $rc on SIG$killsig"; }
for p in /proc/[0-9]*; do
  [ "$(readlink "$p/root" 2>/dev/null)" = "$ch" ] && fail "process ${p#/proc/} ($(tr '\0' ' ' <"$p/cmdline")) is left after the agent stopped"
done
set +e
in_ch vmreplica status >/dev/null 2>&1
rc=$?
set -e
[ "$rc" = 3 ] || fail "vmreplica status without an agent exited $rc, not 3"
phase "stop the agent (SIG$killsig), nothing left"

# --- 5. reinstall, remove, purge -------------------------------------------------------------------
in_ch sh -c "cd /tmp && apt-get install -y --reinstall ./$debname" >"$work/apt-reinstall.log" 2>&1 || { cat "$work/apt-reinstall.log" >&2; fail "reinstall"; }
[ "$(stat -c '%a %U' "$ch/var/lib/vmreplica")" = "700 root" ] || fail "reinstall changed /var/lib/vmreplica"
[ -L "$ch/etc/systemd/system/multi-user.target.wants/vmreplica.service" ] || fail "reinstall dropped the enablement"
in_ch apt-get remove -y vmreplica >"$work/apt-remove.log" 2>&1 || { cat "$work/apt-remove.log" >&2; fail "apt remove"; }
[ ! -e "$unit" ] || fail "apt remove left the unit file"
[ "$(readlink "$ch/etc/systemd/system/vmreplica.service")" = /dev/null ] || fail "apt remove did not mask the unit"
in_ch apt-get purge -y vmreplica >"$work/apt-purge.log" 2>&1 || { cat "$work/apt-purge.log" >&2; fail "apt purge"; }
left=$(find "$ch/etc/systemd" "$ch/lib/systemd" "$ch/usr/lib/systemd" "$ch/var/lib/systemd/deb-systemd-helper-enabled" \
  "$ch/var/lib/systemd/deb-systemd-helper-masked" -name 'vmreplica*' 2>/dev/null || true)
[ -z "$left" ] || fail "apt purge left: $left"
[ ! -e "$ch/usr/bin/vmreplica" ] || fail "apt purge left /usr/bin/vmreplica"
[ -f "$ch/var/lib/vmreplica/config.toml" ] || fail "apt purge deleted the agent directory (it must be kept)"
phase "reinstall, remove (masked), purge (no unit left)"

say "PASS: $debname"
printf '%s\n' "${timings[@]}" >&2
echo "package-test: total $(($(date +%s) - t_start)) s" >&2
