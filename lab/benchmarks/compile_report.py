"""Compile the kernels for a GPU architecture without a GPU and report what the assembler did with them.

For each specialization: registers, spills, shared memory, how many wgmma (HGMMA) instructions the SASS holds and
how many "wait for all wgmma" points follow them (equal counts = ptxas serialized the tensor-core pipeline), and
ptxas's own performance warnings. This is how the detection overhead was traced (lab/kernel-notes.md, v5); it needs
only Triton's bundled ptxas and cuobjdump.

Each specialization is the spec :mod:`liteattn.kernels.dispatch` resolves for the architecture (the portable
kernel's with ``--kernel triton``, on sm90 its TMA form), changed by ``--set FIELD=VALUE`` (spec fields, e.g.
``--set pingpong=False --set tree_max=True``), for both walks, with and without detection.
Run: ``python lab/benchmarks/compile_report.py [--kernel triton|sm90] [--arch 90] [--head-dim 128] [--block-n 128]
[--warps 4] [--stages 2] [--set FIELD=VALUE ...]``.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import subprocess
import tempfile

import torch
import triton

from liteattn.kernels import default_block_sizes, dispatch, portable


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
        target = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"  # the arch-specific features of sm90 (wgmma)
        res = subprocess.run([tool, "-v", f"-arch={target}", path, "-o", os.path.join(d, "k.o")],
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


def _value(text: str):
    """A ``--set`` value: True / False / None, an int, a tuple of ints (``24,240``), else the text."""
    if text in ("True", "False", "None"):
        return {"True": True, "False": False, "None": None}[text]
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    if re.fullmatch(r"\d+(,\d+)+", text):
        return tuple(int(x) for x in text.split(","))
    return text


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--kernel", choices=("triton", "sm90"), default="triton")
    p.add_argument("--arch", type=int, default=90, help="the portable kernel's target (the sm90 kernel: always 90)")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-n", type=int, default=None, help="key tile width (default: the head_dim's default)")
    p.add_argument("--warps", type=int, default=4, help="the portable kernel's num_warps")
    p.add_argument("--stages", type=int, default=2, help="the portable kernel's num_stages")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="a spec field, e.g. pingpong=True")
    args = p.parse_args()
    fields = {f.name for f in dataclasses.fields(dispatch.KernelSpec)}
    overrides = {}
    for item in args.set:
        name, sep, value = item.partition("=")
        if not sep or name not in fields:
            p.error(f"--set: expected FIELD=VALUE with a KernelSpec field ({sorted(fields)}), got {item!r}")
        overrides[name] = _value(value)
    block_m, block_n = default_block_sizes(args.head_dim)
    block_n = args.block_n or block_n
    arch = 90 if args.kernel == "sm90" else args.arch
    for walk, write in (("full", False), ("list", False), ("list", True)):
        spec = dispatch.resolve(("cuda", (arch // 10, arch % 10)), torch.bfloat16, args.head_dim, block_m, block_n,
                                walk)
        if args.kernel == "triton":
            spec = dispatch.portable_spec(spec)
        elif spec.backend != "sm90":
            p.error(f"the sm90 kernel does not take head_dim {args.head_dim} with {block_m}x{block_n} tiles "
                    "(or this Triton cannot build it)")
        spec = dataclasses.replace(spec, **overrides)
        if spec.backend == "sm90":
            from liteattn.kernels import sm90

            kernel = sm90.compile_offline(spec, head_dim=args.head_dim, write_state=write)
        else:
            kernel = portable.compile_offline(spec, head_dim=args.head_dim, arch=arch, write_state=write,
                                              num_warps=args.warps, num_stages=args.stages)
        print(f"walk={walk} write_state={write!s:5}", spec, report(kernel, arch), flush=True)


if __name__ == "__main__":
    main()
