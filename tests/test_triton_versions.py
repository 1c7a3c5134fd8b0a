"""Which Triton runs which kernel: the Gluon (Hopper) kernels on the releases they are tested with, the portable
Triton kernel everywhere else, after one warning and never a crash. The GPU side cannot run here: the choices
are driven through stand-ins for the GPU checks, and the portable kernel runs in Triton's interpreter (with the
TMA descriptors a Hopper would use)."""
from __future__ import annotations

import ast
import dataclasses
import re
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

triton = pytest.importorskip("triton")

from liteattn import SkipState  # noqa: E402
from liteattn.kernels import _gluon, dispatch  # noqa: E402
from liteattn.kernels.common import KernelCall  # noqa: E402
from liteattn.reference import lite_attention_reference  # noqa: E402
from liteattn.state import tile_protection  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def fresh_module_lookup():
    """The module lookup and the specs are cached per process (the lookup's warning is printed once): start and end
    uncached."""
    cached = (dispatch.sm90_module, dispatch.resolve)  # a test may replace the lookup: clear the real ones
    for fn in cached:
        fn.cache_clear()
    yield
    for fn in cached:
        fn.cache_clear()


@pytest.mark.parametrize("version,tested", [("3.5.1", False), ("3.6.0", True), ("3.7.1", True), ("3.8.0", True),
                                            ("3.9.0", True), ("3.9.2+git1a2b", True), ("3.10.0", False),
                                            ("4.0.0", False), ("main", False)])
def test_tested_releases(version, tested):
    assert _gluon.tested(version) is tested


def test_installed_triton_is_a_tested_one():
    """The test suite itself runs on a tested release (.ci/run runs it on both ends of the range)."""
    assert _gluon.tested(), triton.__version__


def test_pyproject_bounds_say_what_is_tested():
    """pyproject.toml admits exactly the tested minor releases of Triton."""
    (spec,) = re.findall(r'^\s*"(triton[^"]*)"', (ROOT / "pyproject.toml").read_text(), re.M)
    lo, hi = _gluon.TESTED
    assert f">={lo[0]}.{lo[1]}" in spec and f"<{hi[0]}.{hi[1] + 1}" in spec, spec


def test_ci_runs_both_ends_of_the_range():
    script = (ROOT / ".ci" / "run").read_text()
    pinned = set(re.findall(r"^run_suite \S+ (\d+\.\d+)\.\d+$", script, re.M))
    assert pinned == {".".join(map(str, v)) for v in _gluon.TESTED}, pinned


def test_gluon_names_resolve_on_this_triton():
    """The kernels call the names bound in _gluon; on every tested release they are Gluon builtins (the
    removed names of 3.9 exist only to raise)."""
    for fn in (_gluon.tma_load, _gluon.tma_store, _gluon.cta_barrier):
        assert getattr(fn, "__triton_builtin__", False), fn
    names = {fn.__name__ for fn in (_gluon.tma_load, _gluon.tma_store, _gluon.cta_barrier)}
    modern = _gluon.triton_version() >= (3, 8)
    assert ("async_load" in names) is modern and ("async_copy_global_to_shared" in names) is not modern
    assert ("barrier" in names) is (_gluon.triton_version() >= (3, 7))


def test_untested_triton_runs_the_portable_kernel_after_one_warning(monkeypatch, fresh_module_lookup):
    monkeypatch.setattr(_gluon, "tested", lambda version=None: False)
    with pytest.warns(RuntimeWarning, match=r"Hopper \(sm90\) kernel is not used: Triton .* is outside the "
                                            r"releases it is tested with \(3\.6 to 3\.9\.x\)") as seen:
        assert dispatch.sm90_module() is None
        assert dispatch.resolve(("cuda", (9, 0)), torch.bfloat16, 128, 128, 128, "list").backend == "triton"
        assert dispatch.sm90_module() is None
    assert len([w for w in seen if w.category is RuntimeWarning]) == 1
    # Off Hopper the module is not even asked for: other GPUs run the portable kernel by design, without a warning.
    dispatch.sm90_module.cache_clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert dispatch.resolve(("cuda", (8, 0)), torch.bfloat16, 128, 128, 128, "list").backend == "triton"


def _inputs(gen):
    q = torch.randn(1, 2, 300, 32, generator=gen).half()
    k, v = (torch.randn(1, 1, 300, 32, generator=gen).half() for _ in range(2))
    state = SkipState.full(1, 2, 300, 300, 128, 128)
    prot = tile_protection([], 300, 128, torch.device("cpu"))
    return q, k, v, state, prot


def _sm90_spec(qk8=False, pv8=False):
    """The sm90 kernel's spec for a Hopper GPU, with index order: a CPU has no L2 size to apply the rule to."""
    spec = dispatch.resolve(("cuda", (9, 0)), torch.float16, 128, 128, 128, "list", False, qk8, pv8)
    assert spec.backend == "sm90", spec
    return dataclasses.replace(spec, work_order="index")


def _run(q, k, v, state, prot, qk8=False, pv8=False):
    counts, indices = state.next_buffers()
    call = KernelCall(q, k, v, state.kv_num_blocks, state.kv_indices, counts, indices, prot, prot, 32 ** -0.5, -2.0,
                      128, 128, "list", True, True, qk8=qk8, pv8=pv8)
    out, lse = dispatch.lite_attention_fwd(call, spec=_sm90_spec(qk8, pv8))
    return out, lse, (counts.clone(), indices.clone())


def test_a_gluon_build_failure_runs_the_portable_kernel(monkeypatch, gen, fresh_module_lookup):
    """A Hopper call whose Gluon kernel fails to compile (here: the removed-API error of Triton 3.9, which a
    version gate would let through if the names moved again) gives the portable kernel's result, with one
    warning; later calls go straight to the portable kernel without trying to build again."""
    from triton.compiler.errors import CompilationError

    attempts = []

    def launch(*args, **kwargs):
        attempts.append(1)
        raise CompilationError(None, ast.parse("x").body[0],
                               "async_copy_global_to_shared has been removed; call async_load instead")

    monkeypatch.setattr(dispatch, "sm90_module", lambda: SimpleNamespace(launch=launch))
    monkeypatch.setattr(dispatch, "_GLUON_BUILD_FAILED", {})
    q, k, v, state, prot = _inputs(gen)
    with pytest.warns(RuntimeWarning, match=rf"Triton {re.escape(triton.__version__)} failed to build it "
                                            r"\(CompilationError: .*async_copy_global_to_shared") as seen:
        out, lse, (counts, indices) = _run(q, k, v, state, prot)
    assert len([w for w in seen if w.category is RuntimeWarning]) == 1 and attempts == [1]
    ref_out, ref_lse, (ref_counts, _) = lite_attention_reference(q.float(), k.float(), v.float(), state, -2.0)
    torch.testing.assert_close(out.float(), ref_out, rtol=0, atol=6e-3)
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=2e-3)
    assert torch.equal(counts, ref_counts)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        again, _, _ = _run(q, k, v, state, prot)
    assert attempts == [1] and torch.equal(again, out)


def test_a_build_failure_of_the_8_bit_kernel_leaves_the_16_bit_one(monkeypatch, gen, fresh_module_lookup):
    """A Triton that cannot build the integer products (only the ``qk8`` specialization fails) still runs the 16-bit
    sm90 kernel: the record of failed builds is per mode."""
    from triton.compiler.errors import CompilationError

    attempts = []

    def launch(spec, *args, **kwargs):
        attempts.append(spec.qk8)
        if spec.qk8:
            raise CompilationError(None, ast.parse("x").body[0], "no integer wgmma")
        raise RuntimeError("CUDA error: reached the 16-bit launch")  # stands for running it, on a CPU

    monkeypatch.setattr(dispatch, "sm90_module", lambda: SimpleNamespace(launch=launch))
    monkeypatch.setattr(dispatch, "_GLUON_BUILD_FAILED", {})
    q, k, v, state, prot = _inputs(gen)
    with pytest.warns(RuntimeWarning, match="failed to build it with 8-bit QK"):
        _run(q, k, v, state, prot, qk8=True)
    _run(q, k, v, state, prot, qk8=True)  # straight to the portable kernel
    with pytest.raises(RuntimeError, match="reached the 16-bit launch"):
        _run(q, k, v, state, prot)
    assert attempts == [True, False]


@pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")
def test_a_build_failure_of_fp8_pv_refuses_the_call(monkeypatch, gen, fresh_module_lookup):
    """fp8 P.V runs only in the Hopper kernel: where this Triton cannot build it, the call is refused with the reason
    (the portable kernel would compute P.V in 16 bits under the mode's name), without trying to build it again; the
    int8 kernel without it is still tried. The record of failed builds is per mode."""
    from triton.compiler.errors import CompilationError

    attempts = []

    def launch(spec, *args, **kwargs):
        attempts.append((spec.qk8, spec.pv8))
        if spec.pv8:
            raise CompilationError(None, ast.parse("x").body[0], "no fp8 wgmma")
        raise RuntimeError("CUDA error: reached the int8 launch")  # stands for running it, on a CPU

    monkeypatch.setattr(dispatch, "sm90_module", lambda: SimpleNamespace(launch=launch))
    monkeypatch.setattr(dispatch, "_GLUON_BUILD_FAILED", {})
    q, k, v, state, prot = _inputs(gen)
    for _ in range(2):
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # refused, not run elsewhere with a warning
            with pytest.raises(ValueError, match=r"pv_dtype='fp8': .*failed to build it \(CompilationError: .*no fp8 "
                                                 r"wgmma\); use pv_dtype=None"):
                _run(q, k, v, state, prot, qk8=True, pv8=True)
    with pytest.raises(RuntimeError, match="reached the int8 launch"):
        _run(q, k, v, state, prot, qk8=True)
    assert attempts == [(True, True), (True, False)]


def test_a_launch_error_is_not_taken_for_a_build_failure(monkeypatch, gen, fresh_module_lookup):
    """A CUDA error of the launch itself (an illegal address, a sticky error) is raised, not hidden behind a
    second kernel."""
    def launch(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(dispatch, "sm90_module", lambda: SimpleNamespace(launch=launch))
    monkeypatch.setattr(dispatch, "_GLUON_BUILD_FAILED", {})
    with pytest.raises(RuntimeError, match="illegal memory access"):
        _run(*_inputs(gen))
