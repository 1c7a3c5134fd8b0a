"""Offline sm90a builds of the Gluon kernel and readers of their code, shared by the kernel's behaviour tests
(tests/test_hopper_kernel.py) and its performance contracts (tests/test_perf_contract.py).

A build runs in a fresh process: the test process runs Triton in interpreter mode, and a compile served from
Triton's cache prints no ptxas report (hence the empty cache directory). Using Triton's own ptxas and flags
matters: Triton 3.9 assembles sm90 with the ptxas of CUDA 13 and ``--regAllocOptLevel=2``, 3.6 with CUDA 12.8's,
and register allocation differs between them.
"""
from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
import tempfile

import triton


def compile_sm90(head_dim: int, block_n: int, walk: str, write_state: bool, **overrides) -> dict:
    """One specialization of the sm90 kernel, compiled for sm90a: the spec :mod:`liteattn.kernels.dispatch` resolves
    for an sm90 GPU in bf16, ragged keys and LSE on. ``block_m``, ``per_call``, ``qk8`` and ``pv8`` in
    ``overrides`` choose what the spec is resolved for (default: 128-row query tiles, the carried rule, 16-bit
    scores and P.V); the
    other ``overrides`` replace its fields (e.g. ``pingpong=True``). Returns ``ptx``, the ``cubin`` Triton's
    ptxas made and that run's ``-v`` report (``log``, printed with TRITON_DUMP_PTXAS_LOG). Built once per test
    session and specialization (a build takes seconds)."""
    return _compile(head_dim, block_n, walk, write_state, tuple(sorted(overrides.items())))


@functools.lru_cache(maxsize=None)
def _compile(head_dim: int, block_n: int, walk: str, write_state: bool, overrides: tuple) -> dict:
    overrides = dict(overrides)
    # Modes and tiles the spec is resolved for (its ring depth and register split follow them), not overrides.
    qk8 = overrides.pop("qk8", False)
    pv8 = overrides.pop("pv8", False)
    per_call = overrides.pop("per_call", False)
    block_m = overrides.pop("block_m", 128)
    with tempfile.TemporaryDirectory() as d:
        ptx_path, cubin_path = os.path.join(d, "k.ptx"), os.path.join(d, "k.cubin")
        code = ("import dataclasses, sys, torch; from liteattn.kernels import dispatch, sm90; "
                "spec = dispatch.resolve(('cuda', (9, 0)), torch.bfloat16, "
                f"{head_dim}, {block_m}, {block_n}, {walk!r}, {per_call}, {qk8}, {pv8}); "
                "assert spec.backend == 'sm90', spec; "
                f"spec = dataclasses.replace(spec, **{overrides!r}); "
                f"k = sm90.compile_offline(spec, head_dim={head_dim}, write_state={write_state}); "
                "open(sys.argv[1], 'w').write(k.asm['ptx']); open(sys.argv[2], 'wb').write(k.asm['cubin'])")
        env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DUMP_PTXAS_LOG="1",
                   TRITON_CACHE_DIR=os.path.join(d, "cache"))
        res = subprocess.run([sys.executable, "-c", code, ptx_path, cubin_path], capture_output=True, text=True,
                             env=env)
        assert res.returncode == 0, res.stderr[-3000:]
        assert "TRITON_DEFAULT_FP_FUSION" not in res.stderr  # fusion is passed, not left to a changing default
        with open(ptx_path) as f:
            ptx = f.read()
        with open(cubin_path, "rb") as f:
            cubin = f.read()
    return dict(ptx=ptx, cubin=cubin, log=res.stdout)


def compile_portable_sm90(head_dim: int, block_m: int, block_n: int, walk: str, write_state: bool,
                          num_warps: int = 8, **fields) -> dict:
    """One specialization of the portable Triton kernel built for sm90 (TMA tile copies, as it runs on Hopper) with
    the spec ``fields`` (e.g. ``qk8=True``) and one of the autotuner's warp counts; returns ``ptx``, ``cubin`` and
    ptxas's ``-v`` report (``log``)."""
    return _compile_portable(head_dim, block_m, block_n, walk, write_state, num_warps, tuple(sorted(fields.items())))


@functools.lru_cache(maxsize=None)
def _compile_portable(head_dim, block_m, block_n, walk, write_state, num_warps, fields: tuple) -> dict:
    code = ("from liteattn.kernels import portable; from liteattn.kernels.dispatch import KernelSpec; "
            f"spec = KernelSpec('triton', {block_m}, {block_n}, {walk!r}, 'index', tma=True, **{dict(fields)!r}); "
            f"k = portable.compile_offline(spec, head_dim={head_dim}, write_state={write_state}, "
            f"num_warps={num_warps}); ")
    return _build(code)


def compile_rounding_sm90(name: str, pointers: dict, constexprs: dict) -> dict:
    """Kernel ``name`` of :mod:`liteattn.kernels.quant` built for sm90 with the given pointer types (other arguments
    i32) and constexprs; returns ``ptx``, ``cubin`` and ptxas's report (``log``)."""
    code = ("import triton; from triton.backends.compiler import GPUTarget; from triton.compiler import ASTSource; "
            f"from liteattn.kernels.quant import {name} as fn; c = {constexprs!r}; p = {pointers!r}; "
            "sig = {a: 'constexpr' if a in c else p.get(a, 'i32') for a in fn.arg_names}; "
            "k = triton.compile(ASTSource(fn, sig, constexprs=c), target=GPUTarget('cuda', 90, 32), "
            "options={'num_warps': 4}); ")
    return _build(code)


def _build(code: str) -> dict:
    """Run ``code`` (which leaves the compiled kernel in ``k``) in a fresh process without the interpreter."""
    with tempfile.TemporaryDirectory() as d:
        ptx_path, cubin_path = os.path.join(d, "k.ptx"), os.path.join(d, "k.cubin")
        code += "import sys; open(sys.argv[1], 'w').write(k.asm['ptx']); open(sys.argv[2], 'wb').write(k.asm['cubin'])"
        env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DUMP_PTXAS_LOG="1",
                   TRITON_CACHE_DIR=os.path.join(d, "cache"))
        res = subprocess.run([sys.executable, "-c", code, ptx_path, cubin_path], capture_output=True, text=True,
                             env=env)
        assert res.returncode == 0, res.stderr[-3000:]
        with open(ptx_path) as f:
            ptx = f.read()
        with open(cubin_path, "rb") as f:
            cubin = f.read()
    return dict(ptx=ptx, cubin=cubin, log=res.stdout)


def sass(cubin: bytes) -> str:
    """SASS of a cubin (Triton's bundled cuobjdump)."""
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        res = subprocess.run([os.path.join(bin_dir, "cuobjdump"), "-sass", path], capture_output=True, text=True,
                             check=True)
    return res.stdout


def tile_loops(sass_text: str) -> list[list[str]]:
    """The innermost loops (a backward branch with none inside) that issue wgmma: the consumers' tile loops."""
    return [[ins for _, ins in body] for body in _tile_loops(sass_text)]


def unskipped(sass_text: str) -> list[list[str]]:
    """Each tile loop's instructions outside every stretch that a forward branch inside the loop jumps over: what
    runs on every tile, whichever way the loop's branches go."""
    paths = []
    for body in _tile_loops(sass_text):
        hi = body[-1][0]
        skipped = [(a, int(t, 16)) for a, ins in body for t in re.findall(r"\bBRA\b.*?0x([0-9a-f]+)", ins)
                   if a < int(t, 16) <= hi]
        paths.append([ins for a, ins in body if not any(b < a < t for b, t in skipped)])
    return paths


def _tile_loops(sass_text: str) -> list[list[tuple[int, str]]]:
    code = [(int(a, 16), ins.strip()) for a, ins in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass_text)]
    back = [(int(t, 16), a) for a, ins in code for t in re.findall(r"\bBRA\b.*?0x([0-9a-f]+)", ins)
            if int(t, 16) <= a]
    loops = []
    for lo, hi in back:
        if any((lo, hi) != other and lo <= other[0] and other[1] <= hi for other in back):
            continue
        body = [(a, ins) for a, ins in code if lo <= a <= hi]
        if any("GMMA" in ins for _, ins in body):  # HGMMA (16-bit), IGMMA (int8), QGMMA (fp8)
            loops.append(body)
    return loops


def unconditional_loads(body: list[str]) -> list[str]:
    """The global loads of a loop body that no predicate guards (``@PT`` counts as unconditional)."""
    return [ins for ins in body if "LDG" in ins and not re.match(r"@!?P[0-6]\b", ins)]


def longest_fmnmx_chain(body: list[str]) -> int:
    """Longest run of FMNMX in a tile loop's SASS where each reads the one before (register dataflow in program
    order; any other instruction writing a register ends the chain through it)."""
    depth, longest = {}, 0
    for ins in body:
        op, _, operands = re.sub(r"^@!?U?P\w+\s+", "", ins).partition(" ")
        regs = re.findall(r"\bR\d+\b", operands)
        if not regs:
            continue
        if op.startswith("FMNMX"):
            depth[regs[0]] = 1 + max((depth.get(r, 0) for r in regs[1:]), default=0)
            longest = max(longest, depth[regs[0]])
        else:
            depth[regs[0]] = 0
    return longest
