"""Compile the kernel for a GPU architecture without a GPU and report what the assembler did with it.

For each specialization: registers, spills, shared memory, how many wgmma (HGMMA) instructions the
SASS holds and how many "wait for all wgmma" points follow them (equal counts = ptxas serialized the
tensor-core pipeline), and ptxas's own performance warnings. This is how the detection overhead was
traced (KERNEL_NOTES.md, v5); it needs only Triton's bundled ptxas/nvdisasm.
Run: ``python benchmarks/compile_report.py [--arch 90] [--head-dim 128] [--warps 4] [--stages 2]`` for the Triton
kernel, ``python benchmarks/compile_report.py --kernel sm90|persistent [--block-n 128]`` for the
warp-specialized Hopper kernels (one program per query tile / per SM; always sm90a).
"""
from __future__ import annotations

import argparse
import importlib
import itertools
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import liteattn.kernels.forward as fwd
from liteattn.kernels import default_block_sizes

POINTERS = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "O": "*bf16", "LSE": "*fp32", "KV_COUNT": "*i32",
            "KV_IDX": "*i16", "NEXT_COUNT": "*i32", "NEXT_IDX": "*i16", "Q_PROT": "*i8", "K_PROT": "*i8",
            "ORDER": "*i32", "FLAGS": "*i32"}
FLOATS = {"qk_scale", "threshold"}
SWITCHES = ("FLAG_WORDS",)  # module-level experiment switches passed as constexprs


def compile_variant(head_dim, warps, stages, arch, **switches):
    fn = fwd._lite_attention_fwd.fn
    bm, bn = default_block_sizes(head_dim)
    constexprs = dict(HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_M=bm, BLOCK_N=bn,
                      DENSE=False, WRITE_STATE=True, RETURN_LSE=False, USE_TMA=True, RAGGED_K=True,
                      BLOCK_C=128, USE_ORDER=True, UPCAST=False)
    constexprs.update({name: getattr(fwd, name) for name in SWITCHES if name in fn.arg_names})
    constexprs.update(switches)
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in POINTERS:
            signature[name] = POINTERS[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in FLOATS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if name.startswith("stride") or name in ("SEQ_Q", "SEQ_K"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn, signature, constexprs=constexprs, attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": warps, "num_stages": stages})
    return kernel, constexprs


def sass_of(kernel):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        return subprocess.run([tool, "-sass", path], capture_output=True, text=True).stdout


def ptxas_verbose(kernel, arch):
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.ptx")
        with open(path, "w") as f:
            f.write(kernel.asm["ptx"])
        res = subprocess.run([tool, "-v", f"-arch=sm_{arch}a", path, "-o", os.path.join(d, "k.o")],
                             capture_output=True, text=True)
    return res.stdout + res.stderr


def report(kernel, arch):
    sass = sass_of(kernel)
    hgmma = len(re.findall(r"\bHGMMA\.", sass))
    waits = len(re.findall(r"WARPGROUP\.DEPBAR\.LE gsb0, 0x0", sass))
    log = ptxas_verbose(kernel, arch)
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores", log)
    return {"regs": int(regs.group(1)) if regs else None, "spill_bytes": int(spills.group(1)) if spills else None,
            "shared": kernel.metadata.shared, "hgmma": hgmma, "wait_all": waits,
            "serialized": hgmma > 0 and waits >= hgmma, "local_ld": sass.count("LDL"),
            "ptxas": [line.strip() for line in log.splitlines() if "Performance" in line or "serializ" in line]}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--warps", type=int, default=4)
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--set", action="append", default=[], help="constexpr override NAME=VALUE (int/bool)")
    p.add_argument("--kernel", choices=("triton", "sm90", "persistent"), default="triton")
    p.add_argument("--block-n", type=int, default=128, help="key tile width of the sm90 kernel (64 or 128)")
    args = p.parse_args()
    if args.kernel in ("sm90", "persistent"):
        module = "hopper" if args.kernel == "sm90" else "hopper_persistent"
        compile_offline = importlib.import_module(f"liteattn.kernels.{module}").compile_offline

        for dense, write in itertools.product((True, False), (False, True)):
            for pingpong in (True, False):
                kernel = compile_offline(block_n=args.block_n, head_dim=args.head_dim, dense=dense,
                                         write_state=write, pingpong=pingpong)
                print(f"dense={dense!s:5} write_state={write!s:5} pingpong={pingpong!s:5}", report(kernel, 90),
                      flush=True)
        return
    overrides = {}
    for item in args.set:
        name, value = item.split("=")
        overrides[name] = {"True": True, "False": False}.get(value, None)
        if overrides[name] is None:
            overrides[name] = int(value)
    for dense, write in itertools.product((True, False), (False, True)):
        kernel, _ = compile_variant(args.head_dim, args.warps, args.stages, args.arch,
                                    **{"DENSE": dense, "WRITE_STATE": write, **overrides})
        r = report(kernel, args.arch)
        print(f"dense={dense!s:5} write_state={write!s:5}", r, flush=True)


if __name__ == "__main__":
    main()
