"""Shared fixtures for the core tests.

Why the environment variable is set here: Triton reads ``TRITON_INTERPRET``
when it is first imported, and conftest runs before any test module imports
liteattn (and with it triton). On a machine with a CUDA GPU the kernel tests
run compiled on the GPU instead, so the same suite checks both.

The shared test functions are exposed as fixtures rather than imported from
this file, so that other ``conftest.py`` files under ``tests/`` cannot shadow
them.
"""
from __future__ import annotations

import math
import os
import random
import zlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from liteattn import lite_attention  # noqa: E402
from liteattn.reference import lite_attention_reference  # noqa: E402
from liteattn.state import SkipState, num_tiles  # noqa: E402

# Fresh random inputs on every run; the seed is printed in the report header so a failure can be replayed
# with LITEATTN_TEST_SEED=<seed>.
BASE_SEED = int(os.environ.get("LITEATTN_TEST_SEED") or random.SystemRandom().randrange(2**31))


def pytest_report_header(config):
    return f"liteattn test seed: {BASE_SEED} (replay with LITEATTN_TEST_SEED={BASE_SEED})"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Attach the run's seed to every failure, since -q hides the report header."""
    report = yield
    if report.failed and "gen" in getattr(item, "fixturenames", ()):
        report.sections.append(("liteattn test seed", f"replay with LITEATTN_TEST_SEED={BASE_SEED}"))
    return report



def _dense_attention(q, k, v, scale=None, tile_mask=None, block=None):
    """Naive softmax attention in float64 on BHSD tensors, written from the definition.

    ``tile_mask`` (B, H, QT, KT) bool, with ``block=(block_m, block_n)``, sets the
    scores of inactive tiles to -inf. Returns ``(out, lse, scores)`` where
    ``scores`` are the scaled scores (B, H, S_q, S_k) and ``lse`` the natural
    log-sum-exp of the (masked) scores.
    """
    q, k, v = (x.double() for x in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k) * scale
    masked = scores
    if tile_mask is not None:
        bm, bn = block
        token_mask = tile_mask.repeat_interleave(bm, dim=2).repeat_interleave(bn, dim=3)
        token_mask = token_mask[:, :, : q.shape[2], : k.shape[2]]
        masked = scores.masked_fill(~token_mask, float("-inf"))
    lse = torch.logsumexp(masked, dim=-1)
    weights = torch.exp(masked - lse[..., None])
    return weights @ v, lse, scores


def _local_qkv(batch, seq_len, heads, kv_heads, head_dim, *, generator, seq_len_k=None, strength=1.0, noise=0.3,
               dtype=torch.float32, device="cpu"):
    """BHSD q, k, v with spatial locality: token i attends mostly to tokens near i.

    q and k share smooth positional features (sines of the position at a few
    frequencies) scaled by ``strength`` plus noise, so far-away key tiles get
    scores many log2 units below the diagonal and a threshold of -3..-8 marks a
    good fraction of them, as in video DiTs. ``v`` is plain noise.
    """
    seq_len_k = seq_len if seq_len_k is None else seq_len_k
    gen = generator
    n_freq = head_dim // 2
    freqs = math.pi / (4.0 * 2.0 ** torch.linspace(0, 4, n_freq, dtype=torch.float64))

    def features(n):
        pos = torch.arange(n, dtype=torch.float64)[:, None] * freqs
        return torch.cat([pos.sin(), pos.cos()], dim=-1)  # [n, D]

    gain = strength * head_dim ** 0.25 / math.sqrt(n_freq) * 2.0
    fq, fk = features(seq_len) * gain, features(seq_len_k) * gain
    q = fq + noise * torch.randn(batch, heads, seq_len, head_dim, generator=gen, dtype=torch.float64)
    k = fk + noise * torch.randn(batch, kv_heads, seq_len_k, head_dim, generator=gen, dtype=torch.float64)
    v = torch.randn(batch, kv_heads, seq_len_k, head_dim, generator=gen, dtype=torch.float64)
    return tuple(x.to(dtype=dtype, device=device) for x in (q, k, v))


def _random_tile_mask(batch, heads, seq_len_q, seq_len_k, block_m, block_n, *, generator, density=0.5):
    """Random (B, H, QT, KT) bool mask with at least one active tile per query tile."""
    gen = generator
    qt, kt = num_tiles(seq_len_q, block_m), num_tiles(seq_len_k, block_n)
    mask = torch.rand(batch, heads, qt, kt, generator=gen) < density
    forced = torch.randint(0, kt, (batch, heads, qt, 1), generator=gen)
    return mask.scatter(-1, forced, True)


def _shuffled(state: SkipState, *, generator) -> SkipState:
    """The same active tiles in a random visiting order per query tile."""
    gen = generator
    counts, indices = state.kv_num_blocks, state.kv_indices.clone()
    kt = indices.shape[-1]
    keys = torch.rand(indices.shape, generator=gen)
    keys = torch.where(torch.arange(kt) < counts[..., None], keys, 2.0)  # unused positions stay last
    perm = keys.argsort(dim=-1)
    return SkipState(counts.clone(), indices.gather(-1, perm).contiguous(), state.seq_len_q, state.seq_len_k,
                     state.block_m, state.block_n)


def _active_lists(state: SkipState) -> list[list[int]]:
    """Each (b, h, query tile)'s stored list as Python lists (its first ``count`` entries)."""
    counts = state.kv_num_blocks.cpu().flatten().tolist()
    indices = state.kv_indices.cpu().flatten(0, 2).tolist()
    return [row[:n] for row, n in zip(indices, counts)]


def _visiting_indices(state: SkipState) -> torch.Tensor:
    """(B, H, QT, KT) int64 tile indices in the order a call visits them.

    A row's stored list, except that a full row (every key tile active) is
    visited in ascending order whatever it stores (SkipState's contract).
    """
    kt = state.shape[-1]
    full = (state.kv_num_blocks == kt)[..., None]
    ascending = torch.arange(kt, device=state.device).expand(state.shape)
    return torch.where(full, ascending, state.kv_indices.long())


def _visiting_lists(state: SkipState) -> list[list[int]]:
    """Each (b, h, query tile)'s tiles in visiting order, as Python lists."""
    counts = state.kv_num_blocks.cpu().flatten().tolist()
    indices = _visiting_indices(state).cpu().flatten(0, 2).tolist()
    return [row[:n] for row, n in zip(indices, counts)]


def _threshold_clear_of_scores(q, k, v, block, must_do, candidates=(-3.0, -2.8, -3.2, -2.6, -3.4, -2.4),
                               **reference_options) -> float:
    """A threshold that no tile's margin (in the reference's walk with ``reference_options``, from a full list) lies
    within the rounding band of, so that a kernel's fp32 scores and the reference's make the same decisions."""
    from liteattn.reference import lite_attention_reference

    full = SkipState.full(q.shape[0], q.shape[1], q.shape[2], k.shape[2], *block)
    for threshold in candidates:
        *_, scores = lite_attention_reference(q.float(), k.float(), v.float(), full, threshold, None, must_do,
                                              return_scores=True, **reference_options)
        if not ((scores - threshold).abs() < 1e-2).any():
            return threshold
    pytest.skip("every candidate threshold lies next to a tile's margin")


@pytest.fixture(scope="session")
def threshold_clear_of_scores():
    return _threshold_clear_of_scores


@pytest.fixture(scope="session")
def dense_attention():
    return _dense_attention


@pytest.fixture(scope="session")
def local_qkv():
    return _local_qkv


@pytest.fixture(scope="session")
def random_tile_mask():
    return _random_tile_mask


@pytest.fixture(scope="session")
def shuffled_state():
    return _shuffled


@pytest.fixture(scope="session")
def active_lists():
    return _active_lists


@pytest.fixture(scope="session")
def visiting_indices():
    return _visiting_indices


@pytest.fixture(scope="session")
def visiting_lists():
    return _visiting_lists


@pytest.fixture(scope="session")
def kernel_device() -> str:
    """Where the Triton kernel runs: the GPU if there is one, else the CPU interpreter."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def gen(request) -> torch.Generator:
    """A generator seeded from the run's seed and the test's id: different inputs per test and per run."""
    return torch.Generator().manual_seed(BASE_SEED ^ zlib.crc32(request.node.nodeid.encode()))


TOL = {torch.float16: dict(out=6e-3, lse=2e-3), torch.bfloat16: dict(out=4e-2, lse=2e-3)}
ROUNDING_BAND = 1e-2  # log2 units around the threshold where the two may disagree


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    return x.transpose(1, 2) if layout == "bshd" else x


def _positions_to_tiles(visiting: torch.Tensor, counts: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Per-visit-position values (B, H, QT, KT) -> per-tile-index values, NaN for tiles not visited."""
    kt = visiting.shape[-1]
    valid = torch.arange(kt) < counts[..., None]
    out = torch.full(values.shape[:-1] + (kt + 1,), float("nan"), dtype=values.dtype)
    out.scatter_(-1, torch.where(valid, visiting, kt), values)
    return out[..., :kt]


@pytest.fixture(scope="session")
def check(kernel_device, active_lists, visiting_lists, visiting_indices):
    """``check(q, k, v, state, threshold=..., ...)``: run kernel and reference from ``state``; assert they agree.

    ``q, k, v`` are BHSD on the CPU (fp16/bf16). Returns the kernel's next state
    (on the CPU) and the number of tiles the reference marked.
    """
    def check_call(q, k, v, state, *, threshold, layout="bhsd", must_do=None, scale=None):
        dtype = q.dtype
        before = state.clone()
        args = [_layout(x.to(kernel_device), layout) for x in (q, k, v)]
        out, lse, nxt = lite_attention(*args, state.to(kernel_device), threshold=threshold, scale=scale,
                                       must_do=must_do, layout=layout, return_lse=True, backend="triton")
        out = _layout(out, layout).cpu()
        ref_out, ref_lse, (ref_counts, ref_indices), scores = lite_attention_reference(
            q.float(), k.float(), v.float(), before, threshold, scale, must_do, return_scores=True)

        assert out.dtype == dtype and out.shape == q.shape and lse.shape == q.shape[:3]
        assert not out.isnan().any() and not lse.isnan().any()
        torch.testing.assert_close(out.float(), ref_out, rtol=0, atol=TOL[dtype]["out"])
        torch.testing.assert_close(lse.cpu(), ref_lse, rtol=0, atol=TOL[dtype]["lse"])

        nxt = nxt.to("cpu")
        ref_next = SkipState(ref_counts, ref_indices, before.seq_len_q, before.seq_len_k, before.block_m,
                             before.block_n)
        got, want = nxt.to_dense(), ref_next.to_dense()
        tile_scores = _positions_to_tiles(visiting_indices(before), before.kv_num_blocks, scores)
        near_threshold = (tile_scores - threshold).abs() < ROUNDING_BAND
        disagree = got != want
        assert not (disagree & ~near_threshold).any(), (
            f"kernel and reference disagree on {int((disagree & ~near_threshold).sum())} tiles away from the threshold")
        # The kernel's list is the visited list with the marked tiles removed, in the same order.
        assert not (got & ~before.to_dense()).any()
        want_lists = [[j for j in row if keep[j]] for row, keep in
                      zip(visiting_lists(before), got.flatten(0, 2).tolist())]
        assert active_lists(nxt) == want_lists
        return nxt, int(before.kv_num_blocks.sum() - ref_counts.sum())

    return check_call
