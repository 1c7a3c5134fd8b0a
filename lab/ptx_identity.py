"""Compile the kernels' default specializations offline and compare their PTX between two revisions.

Why: a refactor of the kernels' host side (how a specialization is chosen and launched) must not change the code
that runs, and without a GPU the generated code is what can be checked. Each specialization below is compiled for
sm90a (the Gluon kernel; the portable Triton kernel with TMA) or sm80 (the portable kernel with pointer loads) with
Triton's bundled assembler, and its PTX is saved with what does not describe the code taken out: debug sections,
``.loc`` / ``.file`` lines and debug labels, and the kernel's name.

The cases are the specializations the tests compile (both walks, with and without detection and LSE, ragged or not,
head_dim 64 and 128, 64- and 128-wide key tiles, index and longest-first order, fp16) and the non-default settings
that development scripts and tests pass (turn-taking, row-max tree, lane sums, register split).

It drives either the current package (kernel settings from :mod:`liteattn.kernels.dispatch`'s specs) or one from
before the specs (kernel settings from the modules' switches: up to 420cb5b, whose kernels are 6139cd3's), selected
by what the imported package has. Usage, from the repository root::

    git archive 6139cd3 liteattn | tar -x -C /tmp/before      # the package before, beside this checkout's
    python lab/ptx_identity.py --out /tmp/ptx-before --package-root /tmp/before
    python lab/ptx_identity.py --out /tmp/ptx-after
    python lab/ptx_identity.py --compare /tmp/ptx-before /tmp/ptx-after

Run it once per Triton release of interest (the code differs between releases, never between the two revisions).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys


def cases() -> list[dict]:
    """Every specialization compared, as plain dicts (their names are the file names)."""
    out = []
    for hd in (64, 128):
        for walk, write in (("full", False), ("list", True), ("list", False)):
            for lse in (True, False):
                for ragged in (True, False):
                    out.append(dict(kernel="sm90", head_dim=hd, block_n=128, walk=walk, write_state=write,
                                    return_lse=lse, ragged=ragged, use_order=False))
        for write in (True, False):
            out.append(dict(kernel="sm90", head_dim=hd, block_n=128, walk="list", write_state=write, return_lse=False,
                            ragged=False, use_order=True))
    for walk, write in (("full", False), ("list", True), ("list", False)):
        out.append(dict(kernel="sm90", head_dim=128, block_n=64, walk=walk, write_state=write, return_lse=True,
                        ragged=True, use_order=False))
    for extra in (dict(regs=(24, 240)), dict(pingpong=True), dict(pingpong=False), dict(tree_max=True),
                  dict(tree_max=False), dict(lane_sums=True), dict(lane_sums=False)):
        for hd, walk, write in ((64, "full", False), (128, "list", True)):
            out.append(dict(kernel="sm90", head_dim=hd, block_n=128, walk=walk, write_state=write, return_lse=True,
                            ragged=True, use_order=False, **extra))
    out.append(dict(kernel="sm90", head_dim=128, block_n=128, walk="list", write_state=True, return_lse=True,
                    ragged=True, use_order=False, dtype="fp16"))
    for hd, bm, bn in ((128, 128, 128), (64, 128, 128), (96, 128, 64), (32, 64, 128)):
        for walk, write in (("full", False), ("list", True), ("list", False)):
            for arch, tma in ((90, True), (80, False)):
                if hd in (96, 32) and arch == 90 and walk == "list" and not write:
                    continue
                out.append(dict(kernel="triton", head_dim=hd, block_m=bm, block_n=bn, walk=walk, write_state=write,
                                return_lse=write, ragged=True, use_order=walk == "list", arch=arch, tma=tma, warps=4,
                                stages=2))
    out.append(dict(kernel="triton", head_dim=128, block_m=128, block_n=128, walk="list", write_state=True,
                    return_lse=True, ragged=False, use_order=True, arch=90, tma=True, warps=8, stages=3))
    return out


def case_name(case: dict) -> str:
    fields = "_".join(f"{k}={v}" for k, v in case.items() if k != "kernel")
    return case["kernel"] + "_" + re.sub(r"[ ()]", "", fields).replace(",", "-")


def normalized(ptx: str, kernel_name: str) -> str:
    """The PTX without what does not describe the code: debug sections, line information, debug labels and
    comments, and the kernel's name (a rename must not count as a change)."""
    ptx = ptx.split("\t.section\t.debug", 1)[0]
    lines = []
    for line in ptx.splitlines():
        stripped = line.strip()
        debug_label = re.fullmatch(r"\$L__(tmp|func_begin|func_end)\d+:", stripped)
        if stripped.startswith((".loc", ".file", "//")) or debug_label:
            continue
        lines.append(re.sub(r"//.*$", "", line).rstrip().replace(kernel_name, "KERNEL"))
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- current package
def compile_with_specs(case: dict):
    import dataclasses

    import torch

    from liteattn.kernels import dispatch, portable, sm90

    dtype = torch.float16 if case.get("dtype") == "fp16" else torch.bfloat16
    if case["kernel"] == "sm90":
        spec = dispatch.resolve(("cuda", (9, 0)), dtype, case["head_dim"], 128, case["block_n"], case["walk"])
        assert spec.backend == "sm90", spec
        spec = dataclasses.replace(spec, **{k: case[k] for k in ("regs", "pingpong", "tree_max", "lane_sums")
                                            if k in case})
        kernel = sm90.compile_offline(spec, head_dim=case["head_dim"], write_state=case["write_state"],
                                      return_lse=case["return_lse"], ragged=case["ragged"],
                                      use_order=case["use_order"], dtype=case.get("dtype", "bf16"))
        return kernel, sm90._lite_attention_fwd_sm90_persistent.__name__
    arch = case["arch"]
    spec = dispatch.portable_spec(dispatch.resolve(("cuda", (arch // 10, arch % 10)), dtype, case["head_dim"],
                                                   case["block_m"], case["block_n"], case["walk"]))
    assert spec.tma is case["tma"], spec
    kernel = portable.compile_offline(spec, head_dim=case["head_dim"], arch=arch, write_state=case["write_state"],
                                      return_lse=case["return_lse"], ragged=case["ragged"],
                                      use_order=case["use_order"], num_warps=case["warps"],
                                      num_stages=case["stages"])
    return kernel, portable._lite_attention_fwd.fn.__name__


# ------------------------------------------------------------------------------ a package from before the specs
def compile_with_switches(case: dict):
    import torch
    import triton

    if case["kernel"] == "sm90":
        from triton.runtime.jit import mangle_type

        import liteattn.kernels.hopper as hopper
        import liteattn.kernels.hopper_persistent as persistent

        hd, bn, dense = case["head_dim"], case["block_n"], case["walk"] == "full"
        x = torch.empty(1, 1, 256, hd, dtype=torch.float16 if case.get("dtype") == "fp16" else torch.bfloat16)
        descs = {"q_desc": persistent._descriptor(x, 64), "k_desc": persistent._descriptor(x, bn),
                 "v_desc": persistent._descriptor(x, bn), "o_desc": persistent._descriptor(x, 64)}
        constexprs = dict(
            BLOCK_D=hd, BLOCK_M=128, BLOCK_N=bn, STAGES=persistent.stages_for(128, bn, hd), DENSE=dense,
            WRITE_STATE=case["write_state"], RETURN_LSE=case["return_lse"], RAGGED_K=case["ragged"],
            USE_ORDER=case["use_order"], PINGPONG=case.get("pingpong", persistent.pingpong_for(hd)),
            PREFETCH=persistent.PREFETCH, BY_POSITION=persistent.BY_POSITION,
            TREE_MAX=case.get("tree_max", hopper.tree_max_for(hd, dense, persistent.TREE_MAX)),
            LANE_SUMS=case.get("lane_sums", hopper.lane_sums_for(dense, persistent.LANE_SUMS)))
        constexprs["PRODUCER_REGS"], constexprs["CONSUMER_REGS"] = case.get("regs", persistent.REGS)
        fn = persistent._lite_attention_fwd_sm90_persistent
        kernel = hopper.compile_sm90a(fn, constexprs, {n: mangle_type(d) for n, d in descs.items()})
        return kernel, fn.__name__
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import liteattn.kernels.forward as forward

    fn = forward._lite_attention_fwd.fn
    hd = case["head_dim"]
    constexprs = dict(HEAD_DIM=hd, BLOCK_D=triton.next_power_of_2(hd), BLOCK_M=case["block_m"],
                      BLOCK_N=case["block_n"], DENSE=case["walk"] == "full", WRITE_STATE=case["write_state"],
                      RETURN_LSE=case["return_lse"], USE_TMA=case["tma"], RAGGED_K=case["ragged"], BLOCK_C=128,
                      USE_ORDER=case["use_order"], UPCAST=False, FLAG_WORDS=forward.FLAG_WORDS)
    pointers = {"LSE": "*fp32", "KV_COUNT": "*i32", "KV_IDX": "*i16", "NEXT_COUNT": "*i32", "NEXT_IDX": "*i16",
                "Q_PROT": "*i8", "K_PROT": "*i8", "ORDER": "*i32", "FLAGS": "*i32"}
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in ("Q", "K", "V", "O") or name in pointers:
            signature[name] = pointers.get(name, "*bf16")
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in ("qk_scale", "threshold"):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if name.startswith("stride") or name in ("SEQ_Q", "SEQ_K"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    kernel = triton.compile(ASTSource(fn, signature, constexprs=constexprs, attrs=attrs),
                            target=GPUTarget("cuda", case["arch"], 32),
                            options={"num_warps": case["warps"], "num_stages": case["stages"],
                                     "enable_fp_fusion": True})
    return kernel, fn.__name__


def dump(out: str, only: str | None) -> None:
    os.environ["TRITON_INTERPRET"] = "0"  # compile, never interpret
    import triton

    import liteattn.kernels

    with_specs = os.path.exists(os.path.join(os.path.dirname(liteattn.kernels.__file__), "dispatch.py"))
    compile_case = compile_with_specs if with_specs else compile_with_switches
    os.makedirs(out, exist_ok=True)
    index = {"triton": triton.__version__, "package": os.path.dirname(liteattn.__file__),
             "api": "specs" if with_specs else "switches", "cases": []}
    for case in cases():
        if only and case["kernel"] != only:
            continue
        name = case_name(case)
        kernel, kernel_name = compile_case(case)
        with open(os.path.join(out, name + ".ptx"), "w") as f:
            f.write(normalized(kernel.asm["ptx"], kernel_name))
        index["cases"].append(name)
        print("compiled", name, flush=True)
    with open(os.path.join(out, "index.json"), "w") as f:
        json.dump(index, f, indent=1)


def compare(before: str, after: str) -> int:
    with open(os.path.join(before, "index.json")) as f:
        a = json.load(f)
    with open(os.path.join(after, "index.json")) as f:
        b = json.load(f)
    if a["triton"] != b["triton"]:
        print(f"different Triton releases: {a['triton']} and {b['triton']}; compare builds of one release")
        return 2
    same, differ, missing = [], [], sorted(set(a["cases"]) ^ set(b["cases"]))
    for name in sorted(set(a["cases"]) & set(b["cases"])):
        with open(os.path.join(before, name + ".ptx")) as f, open(os.path.join(after, name + ".ptx")) as g:
            (same if f.read() == g.read() else differ).append(name)
    print(f"Triton {a['triton']}: {len(same)} identical, {len(differ)} different, {len(missing)} in one only")
    for name in differ:
        print("  different:", name)
    for name in missing:
        print("  in one only:", name)
    return 0 if not differ and not missing else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="write the normalized PTX of every case into this folder")
    p.add_argument("--package-root", help="import liteattn from this folder (e.g. a git archive of a revision)")
    p.add_argument("--kernel", choices=("sm90", "triton"), help="only this kernel's cases")
    p.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"), help="compare two --out folders")
    args = p.parse_args(argv)
    if args.compare:
        return compare(*args.compare)
    if not args.out:
        p.error("--out or --compare: expected one of them")
    if args.package_root:
        sys.path.insert(0, os.path.abspath(args.package_root))
    dump(args.out, args.kernel)
    return 0


if __name__ == "__main__":
    sys.exit(main())
