#!/usr/bin/env bash
# GPU check after a change to the kernels' host path or structure: the GPU tests of the kernel path, then this
# checkout's kernel against an older revision's in one process (lab/benchmarks/ab_revisions.py) at a head_dim-128
# and a head_dim-64 shape, then the demo with its defaults.
#
# Prepare here (the copy travels as an ignored folder):  git archive REV liteattn | tar -x -C .ab/REV
# Run on the GPU machine:  bash lab/refactor_check.sh REV OUTDIR
# Writes OUTDIR/tests.txt, OUTDIR/ab.json, OUTDIR/ab.txt, OUTDIR/demo.json, OUTDIR/demo.txt.
set -uo pipefail
rev="$1"; out="$2"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv | tee "$out/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/device.txt"

# 1. The kernel path's GPU tests (compiled, not interpreted).
timeout 200 python3 -m pytest -q -x -p no:cacheprovider tests/test_dispatch.py tests/test_hopper_kernel.py \
    tests/integrations/test_cuda_graphs.py tests/test_skip_softmax.py 2>&1 | tail -25 > "$out/tests.txt"
echo "tests rc=$?" >> "$out/tests.txt"

# 2. Before/after in one process.
timeout 260 python3 lab/benchmarks/ab_revisions.py --other "before=.ab/$rev/liteattn@$rev" \
    --shapes hdim64,d128-32k --rounds 11 --reps 5 --out "$out/ab.json" > "$out/ab.txt" 2>&1
echo "ab rc=$?" >> "$out/ab.txt"

# 3. The demo with its defaults.
if python3 -c "import diffusers" 2>/dev/null; then
    timeout 120 python3 -m liteattn demo --out /tmp/demo --no-progress > "$out/demo.txt" 2>&1
    echo "demo rc=$?" >> "$out/demo.txt"
    cp /tmp/demo/report.json "$out/demo.json" 2>/dev/null
fi
