#!/usr/bin/env bash
# Fuzz campaign (issue 11): runs every cargo-fuzz target in fuzz/ for SECONDS each (default 60),
# one after another, starting from the seed corpus in fuzz/corpus/<target>/ (never written to:
# what a run finds goes to fuzz/target/run-corpus/<target>/). Minimises nothing. Prints one row
# per target (executions, executions per second, result) and exits non-zero if any target
# crashed, naming the file that holds the crashing input (fuzz/artifacts/<target>/...).
#
#   scripts/fuzz.sh            60 s per target (the campaign in RELIABILITY.md)
#   scripts/fuzz.sh 5          the quick form
#   scripts/fuzz.sh 60 nbd_client catalog    only these targets
#   scripts/fuzz.sh --seeds    rewrite the seed corpus from real encoded values
#
# Needs the nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`). Built without a
# sanitizer (the code under test is safe Rust; panics, overflow checks and debug assertions
# are what fail) to keep the build and the runs fast on small machines.
set -uo pipefail
cd "$(dirname "$0")/.."

TARGETS=(cycle_body cycle_frames cycle_roundtrip staging_reader staging_records nbd_client
    nbd_parsers catalog control_request peer_request qga_parser)

if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: needs the nightly toolchain and cargo-fuzz (cargo install cargo-fuzz)" >&2
    exit 2
fi

if [[ "${1:-}" == "--seeds" ]]; then
    exec cargo +nightly fuzz run -s none seeds
fi

secs="${1:-60}"
if ! [[ "$secs" =~ ^[0-9]+$ ]] || [[ "$secs" -lt 1 ]]; then
    echo "usage: scripts/fuzz.sh [SECONDS] [TARGET...] | --seeds" >&2
    exit 2
fi
shift || true
if [[ $# -gt 0 ]]; then
    TARGETS=("$@")
fi

cargo +nightly fuzz build -s none || exit 2
triple="$(rustc +nightly -vV | sed -n 's/^host: //p')"
bin="fuzz/target/$triple/release"

failed=0
printf '%-16s %10s %10s  %s\n' target execs exec/s result
for t in "${TARGETS[@]}"; do
    if [[ ! -x "$bin/$t" ]]; then
        echo "fuzz.sh: no target $t" >&2
        failed=1
        continue
    fi
    work="fuzz/target/run-corpus/$t"
    art="fuzz/artifacts/$t"
    log="fuzz/target/run-logs/$t.log"
    mkdir -p "$work" "$art" "$(dirname "$log")"
    "$bin/$t" -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        -artifact_prefix="$art/" "$work" "fuzz/corpus/$t" >"$log" 2>&1
    rc=$?
    execs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)"
    rate="$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)"
    if [[ $rc -eq 0 ]]; then
        result=ok
    else
        failed=1
        input="$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -1)"
        result="CRASH (exit $rc): input ${input:-unknown}, log $log"
    fi
    printf '%-16s %10s %10s  %s\n' "$t" "${execs:-?}" "${rate:-?}" "$result"
done
if [[ $failed -ne 0 ]]; then
    echo "fuzz.sh: a target failed; reproduce with: $bin/TARGET INPUT" >&2
fi
exit $failed
