#!/usr/bin/env bash
# Run every fuzz target for a bounded time against the installed build (the
# debug build in CI: bounds checks and assertions on in the compiled core).
#
#   fuzz/run.sh                 # each target FUZZ_SECONDS (default 60) seconds
#   FUZZ_SECONDS=10 fuzz/run.sh native lackey
#
# A target fails on a crash of the compiled core (SIGSEGV, abort: libFuzzer
# "deadly signal"), an exception other than the documented TraceFormatError /
# PksEmuError (fuzz/_common.py), a hang past -timeout, or memory past
# -rss_limit_mb. The input that did it is kept in $FUZZ_ARTIFACTS
# (reproduce: python fuzz/fuzz_TARGET.py --replay FILE). New inputs go to a
# scratch corpus; the seed corpus in fuzz/corpus/ is read, never written.
set -uo pipefail
cd "$(dirname "$0")/.."
seconds=${FUZZ_SECONDS:-60}
artifacts=${FUZZ_ARTIFACTS:-/tmp/pks-emu-fuzz-artifacts}
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(native lackey policy native_v2)
mkdir -p "$artifacts"

if [ -z "${FUZZ_ALLOW_RELEASE:-}" ]; then
    (cd / && python -c 'import pks_emu._core as c; assert c.DEBUG_BUILD, "not a debug build"') || {
        echo "fuzz: install the debug build first (PKS_EMU_DEBUG=1 pip install .), or set FUZZ_ALLOW_RELEASE=1" >&2
        exit 1
    }
fi
python -c 'import atheris' 2>/dev/null || { echo "fuzz: atheris is not installed (pip install atheris)" >&2; exit 1; }

failed=()
for t in "${targets[@]}"; do
    script="fuzz/fuzz_$t.py"
    [ -f "$script" ] || { echo "fuzz: no target $t" >&2; failed+=("$t"); continue; }
    scratch=$(mktemp -d "/tmp/pks-emu-fuzz-$t-XXXXXX")
    log="$artifacts/$t.log"
    echo "+ fuzz $t: ${seconds}s"
    python "$script" -max_total_time="$seconds" -timeout=30 -rss_limit_mb=3072 \
        -artifact_prefix="$artifacts/$t-" -print_final_stats=1 \
        "$scratch" "fuzz/corpus/$t" >"$log" 2>&1
    rc=$?
    rm -rf "$scratch"
    if grep -q "SKIPPED" "$log"; then
        grep "SKIPPED" "$log"
    elif [ $rc -ne 0 ]; then
        echo "fuzz $t: FAILED (exit $rc); log $log; inputs $artifacts/$t-*" >&2
        grep -E "Uncaught Python exception|ERROR: libFuzzer|deadly signal|Traceback|Error:" -A12 "$log" | head -40 >&2
        failed+=("$t")
    else
        grep -E "^stat::number_of_executed_units|DONE" "$log" | tail -2 | sed "s/^/  $t: /"
    fi
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzz: failed: ${failed[*]}" >&2
    exit 1
fi
echo "fuzz: all targets clean"
