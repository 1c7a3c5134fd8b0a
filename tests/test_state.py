"""SkipState: construction, conversions, statistics and double buffering."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from liteattn import SkipState
from liteattn.state import num_tiles, tile_protection

IDX = SkipState.full(1, 1, 16, 16, 16, 16).kv_indices.dtype  # the index dtype (int16; checked below)


def test_num_tiles_covers_ragged_tail():
    assert [num_tiles(s, 16) for s in (1, 15, 16, 17, 32, 33)] == [1, 1, 1, 2, 2, 3]


def test_full_state_visits_every_tile_in_order():
    state = SkipState.full(2, 3, 100, 70, 32, 16)
    assert state.shape == (2, 3, 4, 5)
    assert state.kv_num_blocks.dtype == torch.int32 and state.kv_indices.dtype == torch.int16
    assert torch.equal(state.kv_num_blocks, torch.full((2, 3, 4), 5, dtype=torch.int32))
    assert torch.equal(state.kv_indices, torch.arange(5, dtype=IDX).expand(2, 3, 4, 5))
    assert state.kv_indices.is_contiguous()
    assert state.to_dense().all() and state.sparsity() == 0.0 and state.calls == 0


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 2), h=st.integers(1, 3), seq_q=st.integers(1, 80), seq_k=st.integers(1, 80),
       block_m=st.sampled_from([16, 32]), block_n=st.sampled_from([16, 32]), density=st.floats(0, 1),
       seed=st.integers(0, 2**31 - 1))
def test_from_dense_round_trip(b, h, seq_q, seq_k, block_m, block_n, density, seed):
    gen = torch.Generator().manual_seed(seed)
    qt, kt = num_tiles(seq_q, block_m), num_tiles(seq_k, block_n)
    mask = torch.rand(b, h, qt, kt, generator=gen) < density
    state = SkipState.from_dense(mask, seq_q, seq_k, block_m, block_n)
    assert torch.equal(state.to_dense(), mask)
    assert torch.equal(state.kv_num_blocks, mask.sum(-1).to(torch.int32))
    # Active tiles are listed in ascending order.
    for row, n, m in zip(state.kv_indices.flatten(0, 2), state.kv_num_blocks.flatten(), mask.flatten(0, 2)):
        assert row[:n].tolist() == torch.nonzero(m).flatten().tolist()
    skipped = (~mask).sum().item()
    assert state.sparsity() == pytest.approx(skipped / mask.numel())
    torch.testing.assert_close(state.sparsity_per_head(), (~mask).float().mean(dim=(-1, -2)))


def test_to_dense_ignores_entries_past_the_count():
    counts = torch.tensor([[[2, 0]]], dtype=torch.int32)
    indices = torch.tensor([[[[3, 1, 2, 0], [1, 2, 3, 0]]]], dtype=IDX)  # garbage after the count
    state = SkipState(counts, indices, 32, 64, 16, 16)
    assert state.to_dense().tolist() == [[[[False, True, False, True], [False, False, False, False]]]]
    assert state.sparsity() == pytest.approx(6 / 8)
    torch.testing.assert_close(state.sparsity_per_head(), torch.tensor([[0.75]]))


def test_sparsity_per_head_differs_per_head():
    mask = torch.ones(1, 2, 2, 4, dtype=torch.bool)
    mask[0, 1, :, 1:] = False
    state = SkipState.from_dense(mask, 32, 64, 16, 16)
    torch.testing.assert_close(state.sparsity_per_head(), torch.tensor([[0.0, 0.75]]))
    assert state.sparsity() == pytest.approx(0.375)


def test_clone_is_independent():
    state = SkipState.full(1, 2, 48, 48, 16, 16)
    state.calls = 3
    copy = state.clone()
    copy.kv_num_blocks[0, 0, 0] = 1
    copy.kv_indices[0, 0, 0, 0] = 2
    assert state.kv_num_blocks[0, 0, 0] == 3 and state.kv_indices[0, 0, 0, 0] == 0
    assert copy.calls == 3 and copy.shape == state.shape
    assert (copy.seq_len_q, copy.seq_len_k, copy.block_m, copy.block_n) == (48, 48, 16, 16)


def test_to_keeps_contents_and_metadata():
    state = SkipState.from_dense(torch.rand(1, 2, 3, 2) < 0.5, 40, 32, 16, 16)
    state.calls = 2
    moved = state.to("cpu")
    assert moved.device == torch.device("cpu") and moved.calls == 2
    assert torch.equal(moved.to_dense(), state.to_dense())
    assert (moved.seq_len_q, moved.seq_len_k, moved.block_m, moved.block_n) == (40, 32, 16, 16)


def test_to_same_device_is_a_copy():
    state = SkipState.full(1, 1, 32, 32, 16, 16)
    moved = state.to("cpu")
    moved.kv_num_blocks.zero_()
    assert state.kv_num_blocks.sum() == 4


def test_matches():
    state = SkipState.full(2, 4, 100, 80, 16, 32)
    assert state.matches(2, 4, 100, 80, 16, 32, torch.device("cpu"))
    for changed in [(1, 4, 100, 80, 16, 32), (2, 2, 100, 80, 16, 32), (2, 4, 99, 80, 16, 32),
                    (2, 4, 100, 81, 16, 32), (2, 4, 100, 80, 32, 32), (2, 4, 100, 80, 16, 16)]:
        assert not state.matches(*changed, torch.device("cpu"))
    assert not state.matches(2, 4, 100, 80, 16, 32, torch.device("meta"))


def test_double_buffering_swaps_buffers():
    state = SkipState.full(1, 2, 64, 64, 16, 16)
    spare_counts, spare_indices = state.next_buffers()
    assert state.next_buffers()[0] is spare_counts  # allocated once
    assert spare_counts.shape == state.kv_num_blocks.shape and spare_indices.shape == state.kv_indices.shape
    spare_counts.fill_(1)
    spare_indices.zero_()
    nxt = state.advanced(spare_counts, spare_indices)
    assert nxt.kv_num_blocks is spare_counts and nxt.kv_indices is spare_indices
    assert nxt.calls == state.calls + 1 == 1
    # The old pair becomes the new state's spare: a second call writes into it, allocating nothing.
    again_counts, again_indices = nxt.next_buffers()
    assert again_counts is state.kv_num_blocks and again_indices is state.kv_indices
    third = nxt.advanced(again_counts, again_indices)
    assert third.calls == 2 and third.next_buffers()[0] is spare_counts


def test_clone_has_no_shared_spare():
    state = SkipState.full(1, 1, 32, 32, 16, 16)
    nxt = state.advanced(*state.next_buffers())
    copy = nxt.clone()
    assert copy.next_buffers()[0].data_ptr() not in (state.kv_num_blocks.data_ptr(), nxt.kv_num_blocks.data_ptr())


def test_to_string_and_repr():
    mask = torch.ones(1, 1, 4, 8, dtype=torch.bool)
    mask[0, 0, 0, 1] = False
    mask[0, 0, 2:, :] = False
    mask[0, 0, 3, 0] = True
    state = SkipState.from_dense(mask, 64, 128, 16, 16)
    assert state.to_string().splitlines() == ["#.######", "########", "........", "#......."]
    # Downsampled: 2x2 cells, each '#' (all computed), '.' (none) or '+' (some).
    assert state.to_string(grid=(2, 4)).splitlines() == ["+###", "+..."]
    text = repr(state)
    assert "QT=4" in text and "KT=8" in text and "sparsity=0.500" in text
    assert str(state).startswith(text) and str(state).endswith("#.......")


@pytest.mark.parametrize("bad", [
    dict(counts=torch.zeros(1, 1, 2, dtype=torch.int64)),
    dict(indices=torch.zeros(1, 1, 2, 2, dtype=torch.float32)),
    dict(indices=torch.zeros(1, 1, 2, 2, dtype=torch.int64)),
    dict(counts=torch.zeros(1, 2, dtype=torch.int32)),
    dict(indices=torch.zeros(1, 2, 2, dtype=IDX)),
    dict(counts=torch.zeros(1, 1, 3, dtype=torch.int32)),  # QT != ceil(32 / 16)
    dict(indices=torch.zeros(1, 1, 2, 3, dtype=IDX)),  # KT != ceil(32 / 16)
])
def test_constructor_rejects_bad_buffers(bad):
    counts = bad.get("counts", torch.zeros(1, 1, 2, dtype=torch.int32))
    indices = bad.get("indices", torch.zeros(1, 1, 2, 2, dtype=IDX))
    with pytest.raises(ValueError, match="SkipState"):
        SkipState(counts, indices, 32, 32, 16, 16)


def test_constructor_rejects_mismatched_batch_and_heads():
    with pytest.raises(ValueError, match="SkipState"):
        SkipState(torch.zeros(1, 1, 2, dtype=torch.int32), torch.zeros(2, 4, 2, 2, dtype=IDX), 32, 32, 16, 16)


@pytest.mark.parametrize("args,name", [
    ((32, 32, 0, 16), "block_m"), ((32, 32, 16, -16), "block_n"), ((0, 32, 16, 16), "seq_len_q"),
    ((32, 32, 16.0, 16), "block_m"),
])
def test_full_and_constructor_reject_bad_sizes(args, name):
    with pytest.raises(ValueError, match=name):
        SkipState.full(1, 1, *args)
    with pytest.raises(ValueError, match=name):
        SkipState(torch.zeros(1, 1, 2, dtype=torch.int32), torch.zeros(1, 1, 2, 2, dtype=IDX), *args)


def test_full_rejects_too_many_key_tiles():
    with pytest.raises(ValueError, match="seq_len_k"):
        SkipState.full(1, 1, 16, 16 * 32768 + 1, 16, 16)


def test_from_dense_rejects_too_many_key_tiles():
    mask = torch.zeros(1, 1, 1, 40000, dtype=torch.bool)
    mask[..., [5, 35000]] = True
    with pytest.raises(ValueError, match="key tiles"):
        SkipState.from_dense(mask, 16, 40000 * 16, 16, 16)


def test_from_dense_rejects_non_bool_masks():
    with pytest.raises(ValueError, match="from_dense"):
        SkipState.from_dense(torch.ones(1, 1, 2, 2), 32, 32, 16, 16)
    with pytest.raises(ValueError, match="from_dense"):
        SkipState.from_dense(torch.ones(1, 2, 2, dtype=torch.bool), 32, 32, 16, 16)
    with pytest.raises(ValueError, match="SkipState"):  # mask shape does not fit the sequence lengths
        SkipState.from_dense(torch.ones(1, 1, 2, 2, dtype=torch.bool), 33, 32, 16, 16)


def test_tile_protection_marks_overlapping_tiles():
    prot = tile_protection([(0, 1), (40, 48), (63, 70)], 70, 16, torch.device("cpu"))
    assert prot.tolist() == [1, 0, 1, 1, 1]
    assert tile_protection(None, 70, 16, torch.device("cpu")).tolist() == [0] * 5
    assert tile_protection([(16, 32)], 70, 16, torch.device("cpu")).tolist() == [0, 1, 0, 0, 0]


def _hand_built(counts, lists, kt=4):
    """A (1, 1, QT, kt) state from per-query-tile counts and index lists (16-token tiles)."""
    rows = [list(row) + [0] * (kt - len(row)) for row in lists]
    return (torch.tensor([[counts]], dtype=torch.int32), torch.tensor([[rows]], dtype=IDX), 16 * len(counts),
            16 * kt, 16, 16)


@pytest.mark.parametrize("counts,lists,match", [
    ([2], [[0, 99]], r"kv_indices\[0, 0, 0, 1\] = 99: expected a key-tile index in \[0, KT=4\)"),
    ([2], [[-1, 2]], r"kv_indices\[0, 0, 0, 0\] = -1"),
    ([3], [[1, 2, 1]], r"kv_indices\[0, 0, 0\]: key tile 1 is listed 2 times among the first 3 entries"),
    ([4], [[0, 1, 2, 2]], r"key tile 2 is listed 2 times"),  # a full row's list is checked too
    ([2, -1], [[0, 1], [0]], r"kv_num_blocks\[0, 0, 1\] = -1: expected a count in \[0, KT=4\]"),
    ([5], [[0, 1, 2, 3]], r"kv_num_blocks\[0, 0, 0\] = 5"),
])
def test_hand_built_state_is_checked(counts, lists, match):
    """The issue's findings: index 99 of 4 key tiles was clamped to tile 3, a repeated index counted twice, a
    negative count gave zeros, a count past KT raised torch's IndexError. Each is a ValueError when the state is
    built, and so is the same state loaded back."""
    with pytest.raises(ValueError, match=match):
        SkipState(*_hand_built(counts, lists))
    counts_t, indices_t, *sizes = _hand_built(counts, lists)
    with pytest.raises(ValueError, match=match):
        SkipState.from_state_dict(dict(zip(("kv_num_blocks", "kv_indices", "seq_len_q", "seq_len_k", "block_m",
                                            "block_n"), (counts_t, indices_t, *sizes))))


def test_entries_past_the_count_are_not_checked():
    state = SkipState(*_hand_built([1, 0], [[3, 99, -5, 3], [7, 7, 7, 7]]))
    assert state.to_dense().tolist() == [[[[False, False, False, True], [False, False, False, False]]]]


def test_state_edited_in_place_is_checked_on_request():
    state = SkipState.full(1, 1, 32, 64, 16, 16)
    state.kv_num_blocks[0, 0, 0] = 3
    assert state.validate() is state  # row 0 lists 0, 1, 2: fine
    state.kv_indices[0, 0, 1, 2] = 0
    with pytest.raises(ValueError, match=r"kv_indices\[0, 0, 1\]: key tile 0 is listed 2 times"):
        state.validate()


def test_constructor_checks_dtype_device_and_types():
    counts, indices, *sizes = _hand_built([1], [[0]])
    with pytest.raises(ValueError, match=r"kv_num_blocks: expected torch.int32, got torch.int64 \(convert with"):
        SkipState(counts.long(), indices, *sizes)
    with pytest.raises(ValueError, match="kv_indices: expected a torch.Tensor"):
        SkipState(counts, [[[[0, 0, 0, 0]]]], *sizes)
    with pytest.raises(ValueError, match="expected one device, got cpu and meta"):
        SkipState(counts, indices.to("meta"), *sizes)
    with pytest.raises(ValueError, match="'meta' device hold no values"):
        SkipState(counts.to("meta"), indices.to("meta"), *sizes)
    with pytest.raises(ValueError, match="block_m: expected a positive int, got True"):
        SkipState(counts, indices, 16, 64, True, 16)
    with pytest.raises(ValueError, match="calls: expected an int >= 0"):
        SkipState(counts, indices, *sizes, calls=-1)


def test_state_dict_round_trip_through_torch_save(tmp_path):
    mask = torch.rand(2, 3, 4, 5) < 0.5
    state = SkipState.from_dense(mask, 60, 80, 16, 16)
    state.calls = 4
    path = tmp_path / "state.pt"
    torch.save(state.state_dict(), path)
    loaded = SkipState.from_state_dict(torch.load(path))  # weights_only=True: plain tensors and ints
    assert torch.equal(loaded.to_dense(), mask) and loaded.calls == 4
    assert (loaded.seq_len_q, loaded.seq_len_k, loaded.block_m, loaded.block_n) == (60, 80, 16, 16)
    with pytest.raises(ValueError, match=r"state: missing \['kv_indices'\]"):
        SkipState.from_state_dict({k: v for k, v in state.state_dict().items() if k != "kv_indices"})
    with pytest.raises(ValueError, match="state: expected the dict"):
        SkipState.from_state_dict(state)


def test_unpickled_state_is_checked():
    import pickle

    state = SkipState.from_dense(torch.rand(1, 2, 3, 4) < 0.5, 48, 64, 16, 16)
    again = pickle.loads(pickle.dumps(state))
    assert torch.equal(again.to_dense(), state.to_dense())
    state.kv_indices[0, 0, 0, :] = 9
    state.kv_num_blocks[0, 0, 0] = 1
    with pytest.raises(ValueError, match=r"kv_indices\[0, 0, 0, 0\] = 9"):
        pickle.loads(pickle.dumps(state))


def test_library_built_states_skip_the_content_check(monkeypatch):
    """full, from_dense, clone, to and advanced build valid lists: the check (a full read of the state, a device
    sync on a GPU) runs for hand-built states only, never on the path of a call."""
    calls = []
    monkeypatch.setattr(SkipState, "validate", lambda self: calls.append(1) or self)
    state = SkipState.full(1, 2, 64, 64, 16, 16)
    state = SkipState.from_dense(state.to_dense(), 64, 64, 16, 16).clone().to("cpu")
    state.advanced(*state.next_buffers())
    assert calls == []
    SkipState(state.kv_num_blocks, state.kv_indices, 64, 64, 16, 16)
    assert calls == [1]


def test_sparsity_is_a_value_and_still_callable():
    state = SkipState.from_dense(torch.tensor([[[[True, False, False, True]]]]), 16, 64, 16, 16)
    assert state.sparsity == 0.5 and isinstance(state.sparsity, float)
    assert state.sparsity() == 0.5 and type(state.sparsity()) is float
    assert f"{state.sparsity:.2f}" == "0.50" and "sparsity=0.500" in repr(state)
