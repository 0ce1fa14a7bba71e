#!/usr/bin/env bash
# Runs the srcu and kvm-bus test binaries under valgrind memcheck (errors
# fail the run). valgrind does not implement rseq, so glibc leaves it
# unregistered and srcu runs its atomic counter path here; the unsafe code
# of kvm-bus (non-owning device pointers in bus tables) is covered in full.
#   bash scripts/valgrind.sh
set -euo pipefail
cd "$(dirname "$0")/.."
command -v valgrind >/dev/null || { apt-get update -qq && apt-get install -y -qq valgrind; }
export SRCU_EXPECT_RSEQ=0 SRCU_TORTURE_SECS=${SRCU_TORTURE_SECS:-0.5}
# "--lib": unit tests of the crate, those named after the spec (kvm-bus's
# key index, built whole or with one key inserted, writes spare capacity
# before setting the length: memcheck checks that every word is written; all
# of kvm-bus's unit tests take 6 minutes under valgrind, these under 2).
for spec in "srcu api" "srcu torture" "kvm-bus buses" "kvm-bus stress" "kvm-bus retired_stress" \
    "kvm-bus --lib every_word_of_the_buffer_is_written extend_copied with_inserted"; do
    set -- $spec
    filters=("${@:3}")
    if [ "$2" = --lib ]; then
        target=${1//-/_}
        build=(cargo test -p "$1" --lib --no-run --message-format=json)
    else
        target=$2
        build=(cargo test -p "$1" --test "$2" --no-run --message-format=json)
    fi
    bin=$("${build[@]}" 2>/dev/null |
        python3 -c 'import json,sys
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m.get("executable") and m["target"]["name"]==sys.argv[1]: print(m["executable"])' "$target" | tail -1)
    echo "=== valgrind: $1 $2"
    log=$(mktemp)
    status=0
    valgrind --error-exitcode=9 -q "$bin" --test-threads 2 "${filters[@]}" >"$log" 2>&1 || status=$?
    grep -E "test result|Invalid|uninitialised|definitely lost" "$log" || true
    [ "$status" -eq 0 ] || { cat "$log"; echo "valgrind: errors (exit $status) in $1 $2"; exit 1; }
done
echo "valgrind: no errors"
