#!/usr/bin/env bash
# GPU run of the calibration comparison (docs/calibration.md) with attention times: the kernel's skip-softmax mode
# checked against the reference, timed against the carried rule at set skipped fractions, a calibrated profile at
# the testbed's GPU size, and the five ways of choosing what to skip on held-out inputs.
#
# Run on the GPU machine (diffusers installed):  bash lab/skip_rules_gpu.sh OUTDIR [PHASES]
# PHASES: any of tests,timing,calibrate,compare (default: all); compare uses OUTDIR/profile.json when present.
# Writes OUTDIR/tests.txt, timing.json/.txt, profile.json, calibrate.txt, comparison.json, compare.txt.
set -uo pipefail
out="$1"; phases="${2:-tests,timing,calibrate,compare}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
has() { [[ ",$phases," == *",$1,"* ]]; }

if has tests; then
    timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests/test_skip_softmax.py 2>&1 | tail -15 > "$out/tests.txt"
    echo "tests rc=$?" >> "$out/tests.txt"
fi
if has timing; then
    timeout 150 python3 lab/benchmarks/skip_softmax_timing.py --out "$out/timing.json" > "$out/timing.txt" 2>&1
    echo "timing rc=$?" >> "$out/timing.txt"
fi
if has calibrate; then
    # The GPU size (32 frames of 64 px, 30 steps), 2 calibration inputs; the comparison measures the profile on
    # held-out inputs. The work folder (dense outputs) stays on the machine.
    timeout 330 python3 -m liteattn calibrate --device cuda --inputs 2 --held-out 0 --dense-steps 3 --ranges 2 \
        --batch 2 --name testbed-h200 --out /tmp/calibration --no-progress > "$out/calibrate.txt" 2>&1
    echo "calibrate rc=$?" >> "$out/calibrate.txt"
    cp /tmp/calibration/profile.json "$out/profile.json" 2>/dev/null
fi
if has compare; then
    profile=()
    [[ -f "$out/profile.json" ]] && profile=(--profile "calibrated=$out/profile.json")
    timeout 500 python3 lab/calibration_comparison.py --device cuda --frames 32 --pixels 64 --steps 30 --inputs 8 \
        --batch 4 --thresholds -4 -3 -2 -1 -0.5 --per-call -1 -0.5 --time "${profile[@]}" --out /tmp/comparison \
        > "$out/compare.txt" 2>&1
    echo "compare rc=$?" >> "$out/compare.txt"
    cp /tmp/comparison/comparison.json "$out/comparison.json" 2>/dev/null
fi
