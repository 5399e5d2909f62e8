#!/usr/bin/env bash
# The stressed runs of issue 12 (RELIABILITY.md, "Stressed runs"): rounds of the test command
# (scripts/test.sh) and the demo (scripts/demo.sh), each round with `stress-ng --cpu 2` running
# beside it, on this checkout's committed state. Every round is appended to a ledger that
# outlives the run, so that rounds of several sessions count together:
#   scripts/soak.sh [ROUNDS]      ROUNDS rounds (default 1); stops at the first failure
#   scripts/soak.sh --report      the ledger and the current streak of passing rounds
# The ledger is target/soak/ledger.tsv (SOAK_LEDGER overrides); each failing round's output is
# kept in target/soak/. Exit codes: 0 every round passed, 1 a round failed, 2 bad usage or a
# checkout with uncommitted changes (a round must name the commit it tested).
set -euo pipefail
cd "$(dirname "$0")/.."
dir=target/soak
ledger=${SOAK_LEDGER:-$dir/ledger.tsv}
mkdir -p "$dir" "$(dirname "$ledger")"
[ -f "$ledger" ] || printf 'started_utc\tcommit\ttest_s\ttest\tdemo_s\tdemo\n' >"$ledger"

report() {
  column -t -s $'\t' "$ledger"
  # The streak: passing rounds since the last failing one, newest last.
  awk -F'\t' 'NR > 1 { if ($4 == "pass" && $6 == "pass") n++; else n = 0 }
      END { printf "streak: %d round(s) in a row passed\n", n }' "$ledger"
}

rounds=1
case "${1:-}" in
  --report) report; exit 0 ;;
  "") ;;
  *[!0-9]*) echo "usage: scripts/soak.sh [ROUNDS] | --report" >&2; exit 2 ;;
  *) rounds=$1 ;;
esac
if [ -n "$(git status --porcelain --untracked-files=no)" ]; then
  echo "soak.sh: the checkout has uncommitted changes; commit them first (a round names its commit)" >&2
  exit 2
fi
if ! command -v stress-ng >/dev/null 2>&1; then
  if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
  echo "soak.sh: installing stress-ng" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq stress-ng >&2
fi

stress_pid=
stop_stress() {
  if [ -n "$stress_pid" ]; then
    kill "$stress_pid" 2>/dev/null || true
    wait "$stress_pid" 2>/dev/null || true
    stress_pid=
  fi
}
trap stop_stress EXIT INT TERM

# Runs one step with its output in $dir/$2.log; prints "SECONDS pass|fail".
step() {
  local cmd=$1 log=$dir/$2.log t0 rc=0
  t0=$(date +%s)
  "$cmd" >"$log" 2>&1 || rc=$?
  if [ "$rc" -eq 0 ]; then echo "$(($(date +%s) - t0)) pass"; else echo "$(($(date +%s) - t0)) fail"; fi
}

commit=$(git rev-parse --short HEAD)
for i in $(seq 1 "$rounds"); do
  started=$(date -u +%Y-%m-%dT%H:%MZ)
  stress-ng --cpu 2 --quiet &
  stress_pid=$!
  read -r test_s test_r < <(step scripts/test.sh "round-$started-test")
  read -r demo_s demo_r < <(step scripts/demo.sh "round-$started-demo")
  stop_stress
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$started" "$commit" "$test_s" "$test_r" "$demo_s" "$demo_r" >>"$ledger"
  echo "soak.sh: round $i of $rounds ($commit): test command $test_r in ${test_s} s, demo $demo_r in ${demo_s} s"
  if [ "$test_r" != pass ] || [ "$demo_r" != pass ]; then
    echo "soak.sh: the round's output is in $dir/round-$started-*.log" >&2
    report
    exit 1
  fi
  rm -f "$dir/round-$started-test.log" "$dir/round-$started-demo.log"
done
report
