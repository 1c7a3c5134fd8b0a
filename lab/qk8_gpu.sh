#!/usr/bin/env bash
# GPU run of the 8-bit modes (docs/benchmarks.md, "8-bit Q.K^T"): their tests against the reference, then their
# timing and accuracy beside cuDNN and the 16-bit kernel (lab/benchmarks/qk8_timing.py: int8 Q.K^T, alone and with
# fp8 P.V).
#
# Run on the GPU machine:  bash lab/qk8_gpu.sh OUTDIR [PHASES] [SHAPES]
# PHASES: any of tests,lse,timing,eval (default: all); SHAPES: qk8_timing.py's --shapes (default wan1.3b,hdim64).
# TIMING_ARGS: more options for qk8_timing.py (e.g. "--clocks").
# eval: the testbed at the GPU size over 16 prompt x seed pairs, dense against int8 with nothing skipped (threshold
# -1000) and int8 with the default skipping (-1, 3 dense steps), EVAL_ARGS="--pv-dtype fp8" for fp8 P.V as well;
# needs the diffusers wheel in .whl/.
set -uo pipefail
out="$1"; phases="${2:-tests,lse,timing,eval}"; shapes="${3:-wan1.3b,hdim64}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
has() { [[ ",$phases," == *",$1,"* ]]; }

if has tests; then
    timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_qk_int8_kernel.py tests/test_pv_fp8.py \
        ${TESTS:-} 2>&1 \
        | tail -40 > "$out/tests.txt"
    echo "tests rc=${PIPESTATUS[0]}" >> "$out/tests.txt"
fi
if has lse; then
    timeout 120 python3 lab/qk8_lse_check.py > "$out/lse.txt" 2>&1
    echo "lse rc=$?" >> "$out/lse.txt"
fi
if has timing; then
    (cd lab/benchmarks && timeout 300 python3 qk8_timing.py --shapes "$shapes" --rounds "${ROUNDS:-5}" --reps 3 \
        --out "$out/qk8-timing.json" ${TIMING_ARGS:-}) > "$out/timing.txt" 2>&1
    echo "timing rc=$?" >> "$out/timing.txt"
fi
if has eval; then
    python3 -m pip install -q --no-deps .whl/diffusers-*.whl > /dev/null 2>&1
    # shellcheck disable=SC2086  # EVAL_ARGS: more options, e.g. "--prompts 4 --no-timing"
    timeout "${EVAL_TIMEOUT:-300}" python3 -m liteattn eval --device cuda --prompts 8 --seeds 2 --threshold -1000 -1 \
        --dense-steps 3 --qk-dtype int8 --out /tmp/eval-int8 --no-progress ${EVAL_ARGS:-} > "$out/eval.txt" 2>&1
    echo "eval rc=$?" >> "$out/eval.txt"
    cp /tmp/eval-int8/eval.json /tmp/eval-int8/eval.md "$out/" 2>/dev/null
fi
