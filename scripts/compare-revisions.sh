#!/usr/bin/env bash
# Compares two revisions side by side in one run, interleaved (before, after, before, ...):
# a clean `cargo build --release --workspace` and `fleet-bench rollout` (the rollout wall time
# of 20 hosts). What a layout change may cost is measured with it.
#
#   bash scripts/compare-revisions.sh BEFORE AFTER [BUILD_RUNS] [BENCH_RUNS]
#
# Each revision is checked out into its own worktree under a temporary directory (removed at
# the end); every build starts from an empty target directory. Prints one line per run and the
# medians. Talks to loopback only (fleet-bench).
set -euo pipefail
cd "$(dirname "$0")/.."
before=${1:?usage: compare-revisions.sh BEFORE AFTER [BUILD_RUNS] [BENCH_RUNS]}
after=${2:?usage: compare-revisions.sh BEFORE AFTER [BUILD_RUNS] [BENCH_RUNS]}
build_runs=${3:-5}
bench_runs=${4:-5}
work=$(mktemp -d)
cleanup() {
  git worktree remove --force "$work/before" 2>/dev/null || true
  git worktree remove --force "$work/after" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
git worktree add -q --detach "$work/before" "$before"
git worktree add -q --detach "$work/after" "$after"

median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

for side in before after; do : >"$work/$side.build"; : >"$work/$side.bench"; done
for i in $(seq "$build_runs"); do
  for side in before after; do
    rm -rf "$work/$side/target"
    start=$(date +%s.%N)
    (cd "$work/$side" && cargo build -q --release --workspace 2>/dev/null)
    secs=$(awk -v s="$start" -v e="$(date +%s.%N)" 'BEGIN {printf "%.1f", e - s}')
    echo "$secs" >>"$work/$side.build"
    echo "build $i $side: ${secs}s"
  done
done
for i in $(seq "$bench_runs"); do
  for side in before after; do
    # The wall time of the 20-host rollout, in ms.
    line=$(cd "$work/$side" && cargo run -q --release -p fleet-tests --bin fleet-bench -- rollout 2>/dev/null | grep "wall time")
    ms=$(echo "$line" | grep -oE '[0-9]+(\.[0-9]+)? ?ms' | head -1 | grep -oE '[0-9.]+')
    echo "$ms" >>"$work/$side.bench"
    echo "rollout $i $side: ${ms} ms ($line)"
  done
done
b=$(median <"$work/before.build"); a=$(median <"$work/after.build")
echo "clean release build, median of $build_runs: before ${b}s, after ${a}s, ratio $(awk -v a="$a" -v b="$b" 'BEGIN {printf "%.3f", a / b}')"
b=$(median <"$work/before.bench"); a=$(median <"$work/after.bench")
echo "fleet-bench rollout wall time, median of $bench_runs: before ${b} ms, after ${a} ms, ratio $(awk -v a="$a" -v b="$b" 'BEGIN {printf "%.3f", a / b}')"
