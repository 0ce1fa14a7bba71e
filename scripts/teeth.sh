#!/usr/bin/env bash
# Proves that the srcu tests have teeth: rebuilds the crate with one key
# barrier (or the membarrier call, or the rseq restart) removed through
# `--cfg srcu_teeth="<x>"`, runs loom, the litmus test and the torture test
# against each build, and reports which of them catches the removal.
#
#   bash scripts/teeth.sh            # all removals (~10 minutes on 2 cores)
#   bash scripts/teeth.sh a b        # just these
#
# `try_take` makes `Stale::try_take` ignore the grace period, so kvm-bus
# frees retired tables under their readers: the kvm-bus `buses` suite
# (run for every removal) must catch it.
#
# A removal is CAUGHT when at least one suite fails. `rseq_wide` is the
# control: the widened rseq window *with* its restart must pass everything.
# `scan1` deletes the first scan of a grace period (the inactive index,
# before the flip): the race of a reader on a stale index, which the
# torture test's max-rate phase must catch on its own. `e` is not in the
# default list: barrier E is a local fence documented as redundant
# (srcutree.c says so too; see srcu/src/barriers.rs), so removing it is
# expected to go unnoticed; run `bash scripts/teeth.sh e` to see that.
set -u
cd "$(dirname "$0")/.."
removals=("$@")
[ ${#removals[@]} -eq 0 ] && removals=(a b c d scan1 membarrier rseq_restart try_take rseq_wide)
export SRCU_LITMUS_ITERS=${SRCU_LITMUS_ITERS:-4000000}
export SRCU_TORTURE_SECS=${SRCU_TORTURE_SECS:-1}
summary=()
run() { # name, logfile, command...
    local name=$1 log=$2; shift 2
    if timeout 900 "$@" >"$log" 2>&1; then echo "pass"; else echo "FAIL"; fi
}
for x in "${removals[@]}"; do
    echo "=== srcu_teeth=\"$x\""
    log=target/teeth-logs/$x; mkdir -p "$log"
    loom=$(RUSTFLAGS="--cfg loom --cfg srcu_teeth=\"$x\"" CARGO_TARGET_DIR=target/teeth-loom \
        run loom "$log/loom.txt" cargo test -p srcu --release --test loom)
    litmus=$(RUSTFLAGS="--cfg srcu_teeth=\"$x\"" CARGO_TARGET_DIR=target/teeth \
        run litmus "$log/litmus.txt" cargo test -p srcu --release --test litmus -- --nocapture)
    torture=$(RUSTFLAGS="--cfg srcu_teeth=\"$x\"" CARGO_TARGET_DIR=target/teeth \
        run torture "$log/torture.txt" cargo test -p srcu --release --test torture -- --nocapture --test-threads 1)
    buses=$(RUSTFLAGS="--cfg srcu_teeth=\"$x\"" CARGO_TARGET_DIR=target/teeth \
        run buses "$log/buses.txt" cargo test -p kvm-bus --release --test buses)
    verdict="not caught"
    if [ "$loom" = FAIL ] || [ "$litmus" = FAIL ] || [ "$torture" = FAIL ] || [ "$buses" = FAIL ]; then verdict="CAUGHT"; fi
    if [ "$x" = rseq_wide ]; then
        # The control: same widened window, restart kept. Must pass.
        if [ "$verdict" = CAUGHT ]; then verdict="CONTROL FAILED"; else verdict="control passes"; fi
    fi
    line=$(printf '| %-13s | %-5s | %-6s | %-7s | %-5s | %s |' "$x" "$loom" "$litmus" "$torture" "$buses" "$verdict")
    echo "$line"
    grep -hE "^(litmus|torture|counters) |forbidden|panicked at|SIGSEGV" "$log"/*.txt | head -8 | sed 's/^/    /'
    summary+=("$line")
done
echo
echo "| removed       | loom  | litmus | torture | buses | verdict |"
echo "|---------------|-------|--------|---------|-------|---------|"
printf '%s\n' "${summary[@]}"
