"""Time this checkout's kernel against copies of the package taken from other revisions, in one process.

Why: a kernel change that is not a spec setting (``kernel_variants.py`` times those) would otherwise be
compared with the code before it in separate processes, minutes apart, where the clock under the power cap
differs by more than the change (lab/kernel-notes.md v11). Here each copy is imported under its own module name
(its relative imports stay inside the copy, and Triton compiles its kernels apart, keyed by their source), and
all are checked (dense calls against cuDNN, sparse ones against this checkout's) and then timed in the same
interleaved rounds, each in a new seeded order.
Every package gets the same inputs and its states from the same masks, so the calls differ only in code.

Make a copy of a revision's package: ``git archive REV liteattn | tar -x -C DIR`` (gives DIR/liteattn).
Run: ``python lab/benchmarks/ab_revisions.py --other NAME=DIR/liteattn[@LABEL] [--other ...] [--shapes
hdim64,wan1.3b] [--rounds 11] [--reps 5] [--qk-dtype int8] [--out FILE]``. ``this`` is the checkout's own package;
ratios are NAME over ``this``, and ``wins`` counts the rounds in which NAME was faster than ``this``. LABEL (e.g.
the revision's commit) is what the JSON records for the copy, in place of its folder.

One thing the copies do share: torch's registry of custom ops. Every copy registers ``liteattn::forward`` again,
and the last registration serves all of them. The timed calls here are eager and need no gradient, so they launch
the kernel without the op (``kernels.op.run_forward``, since v10); a copy from before that would run another
copy's kernel through the op, so it is refused (and none of this may run under ``torch.compile``).
"""
from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import random
import statistics
import sys
import types

import torch

import liteattn
from kernel_dev import sdpa  # same folder: the script's directory is on sys.path
from kernel_variants import SHAPES
from liteattn.bench.run import _positive
from liteattn.bench.timing import time_cuda
from liteattn.kernels import default_block_sizes
from specs import random_state

CASES = ("dense", "detect_list", "sparse0.5_detect", "sparse0.9")
RESERVED = ("this", "cudnn")  # the checkout's package and the baseline's row


def load_copy(name: str, package_dir: str) -> types.ModuleType:
    """Import the package at ``package_dir`` (a folder with ``__init__.py``) as the top-level module ``name``."""
    init = os.path.join(package_dir, "__init__.py")
    if not os.path.isfile(init):
        raise SystemExit(f"--other {name}={package_dir}: expected a package folder with __init__.py "
                         "(e.g. DIR/liteattn after `git archive REV liteattn | tar -x -C DIR`)")
    if not name.isidentifier() or name in RESERVED:
        raise SystemExit(f"--other {name}=...: expected a Python identifier other than {RESERVED} as NAME")
    if name in sys.modules:
        raise SystemExit(f"--other {name}=...: NAME {name!r} is already imported or given twice; pick another")
    spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[package_dir])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # before executing: its submodules import from it by name
    spec.loader.exec_module(module)
    if not hasattr(importlib.import_module(f"{name}.kernels.op"), "run_forward"):
        raise SystemExit(f"--other {name}={package_dir}: this copy launches its kernel through the shared "
                         "custom op even in eager mode (before v10), so another copy's kernel would be timed")
    return module


def load_others(parser: argparse.ArgumentParser, specs: list[str]) -> tuple[dict, dict]:
    """This checkout's package and every ``--other NAME=DIR[@LABEL]`` copy, by NAME (``"this"`` for the checkout),
    and the label each is recorded under."""
    packages, labels = {"this": liteattn}, {"this": "this checkout"}
    for spec in specs:
        name, sep, rest = spec.partition("=")
        path, _, label = rest.partition("@")
        if not sep or not path:
            parser.error(f"--other: expected NAME=DIR[@LABEL], got {spec!r}")
        packages[name] = load_copy(name, os.path.abspath(path))
        labels[name] = label or name
    return packages, labels


def cases_for(pkg, q, k, v, masks, qk_dtype=None):
    """The timed calls of one package: the full walk (enabled=False), detection on a full list, and two random states, built
    from ``masks`` (skipped fraction -> (B, H, QT, KT) bool, True = computed; shared by every package); every call
    with ``qk_dtype``."""
    b, s, h, d = q.shape
    bm, bn = pkg.kernels.default_block_sizes(d)
    if (bm, bn) != default_block_sizes(d):
        raise SystemExit(f"{pkg.__name__}: tiles {(bm, bn)} at head_dim {d}, the checkout's are "
                         f"{default_block_sizes(d)}: the same masks cannot serve both")
    full_list, half, tenth = (pkg.SkipState.from_dense(masks[f], s, s, bm, bn) for f in (0.0, 0.5, 0.9))
    attend = functools.partial(pkg.lite_attention, qk_dtype=qk_dtype) if qk_dtype else pkg.lite_attention
    calls = {"dense": lambda: attend(q, k, v, enabled=False),
             "detect_list": lambda: attend(q, k, v, full_list, threshold=-1e4),
             "sparse0.5_detect": lambda: attend(q, k, v, half, threshold=-1e4),
             "sparse0.9": lambda: attend(q, k, v, tenth, threshold=float("-inf"))}
    assert tuple(calls) == CASES
    return calls


def time_shape(shape, packages, rounds, reps, qk_dtype=None):
    torch.manual_seed(0)
    q, k, v = (torch.randn(*SHAPES[shape], device="cuda", dtype=torch.bfloat16) for _ in range(3))
    ref = sdpa(q, k, v).float()
    b, s, h, d = q.shape
    tiles = default_block_sizes(d)
    masks = {f: random_state(b, h, s, *tiles, f).to_dense() for f in (0.0, 0.5, 0.9)}  # 0.0: full lists
    calls = {("cudnn", "sdpa"): lambda: sdpa(q, k, v)}
    # Nothing is marked at -1e4, so the first two cases equal dense attention (cuDNN); the sparse cases of a copy
    # run on the same states as this checkout's (the first package) and must give its outputs. With 8-bit scores
    # every case is checked against this checkout's, and this checkout's dense output against cuDNN by relative
    # L1 (8-bit rounding moves single entries further than the 2e-2 gate; SageAttention's bound is 0.02).
    expected = {} if qk_dtype else {"dense": ref, "detect_list": ref}
    checks = {}
    for name, pkg in packages.items():
        for case, fn in cases_for(pkg, q, k, v, masks, qk_dtype).items():
            calls[name, case] = fn
            out = fn()[0].float()
            want = expected.setdefault(case, out)
            checks[f"{name}/{case}"] = {"max_abs_err": (out - want).abs().max().item(),
                                        "nan": bool(out.isnan().any())}
            if qk_dtype and name == "this" and case == "dense":
                checks[f"{name}/{case}"]["rel_l1_vs_cudnn"] = ((out - ref).abs().sum() / ref.abs().sum()).item()
    bad = {key: c for key, c in checks.items()
           if c["nan"] or c["max_abs_err"] > 2e-2 or c.get("rel_l1_vs_cudnn", 0.0) > 0.02}
    if bad:
        against = ("this checkout's (and cuDNN's by relative L1)" if qk_dtype
                   else "cuDNN's (dense, detect_list) or this checkout's")
        raise SystemExit(f"{shape}: outputs differ from {against}: {bad}")
    times = {key: [] for key in calls}
    for r in range(rounds):
        order = list(calls)
        random.Random(r).shuffle(order)  # no call always follows the same one (the power cap)
        for key in order:
            times[key].append(time_cuda(calls[key], budget_ms=0, min_reps=reps, max_reps=reps).median_ms)
    med = {key: statistics.median(t) for key, t in times.items()}
    cudnn = med["cudnn", "sdpa"]
    rows = {}
    for case in CASES:
        row = {name: round(med[name, case], 4) for name in packages}
        row["this_over_cudnn"] = round(med["this", case] / cudnn, 4)
        for name in packages:
            if name != "this":
                row[f"{name}_over_this"] = round(med[name, case] / med["this", case], 4)
                row[f"{name}_wins"] = sum(a < b for a, b in zip(times[name, case], times["this", case]))
        rows[case] = row
    return {"cudnn_ms": round(cudnn, 4), "checks": checks, "ms": rows,
            "rounds": {f"{name}/{case}": t for (name, case), t in times.items()}}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--other", action="append", default=[], metavar="NAME=DIR[@LABEL]",
                   help="a copy of the package to compare, imported as NAME, recorded as LABEL (repeatable)")
    p.add_argument("--shapes", default="hdim64,wan1.3b", help=f"comma-separated, of {sorted(SHAPES)}")
    p.add_argument("--rounds", type=_positive(int), default=11)
    p.add_argument("--reps", type=_positive(int), default=5, help="timed calls per case and round")
    p.add_argument("--qk-dtype", default=None, choices=["int8"], help="every package's calls with this qk_dtype")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("ab_revisions.py times CUDA kernels: no CUDA GPU is visible")
    unknown = [s for s in args.shapes.split(",") if s not in SHAPES]
    if unknown:
        p.error(f"--shapes: unknown {unknown}; known: {sorted(SHAPES)}")
    packages, labels = load_others(p, args.other)
    result = {"device": torch.cuda.get_device_name(), "packages": labels, "rounds": args.rounds,
              "reps": args.reps, "qk_dtype": args.qk_dtype, "shapes": {}}
    for shape in args.shapes.split(","):
        res = time_shape(shape, packages, args.rounds, args.reps, args.qk_dtype)
        torch.cuda.empty_cache()  # the shape's tensors are gone with time_shape's frame
        result["shapes"][shape] = res
        print(shape, "cudnn", res["cudnn_ms"], "ms", json.dumps(res["ms"]), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
