"""The ranks of ``test_context_parallel.py``: several CPU processes under diffusers' context parallelism.

``python parallel_worker.py WORLD OUTDIR SCENARIO...`` starts WORLD processes (``torch.multiprocessing``, gloo
over a file store in OUTDIR); each runs the scenarios in order and saves what it saw to
``OUTDIR/<scenario>-<rank>.pt``, or the traceback as ``{"error": ...}`` so that one failing scenario fails only its
own tests. Exit status 0 when every rank ran, :data:`CANNOT_START` when processes or gloo cannot start here (the
tests skip then).

Why a script of its own and not workers inside pytest: the ranks start from this file's state, not from a pytest
session's. They are forked after torch, diffusers and liteattn are imported, so that no rank imports them again
(four ranks took 49 s spawned and 12 s forked on two busy cores); where fork is missing they are spawned, and
re-import this file (guarded by ``__name__``). Each rank sets one intra-op thread, so that two ranks on two cores
do not fight over them (ten times slower otherwise).

The settings (model, threshold, steps) are module constants: the test builds its one-process references from the
same ones.
"""
from __future__ import annotations

import datetime
import importlib.util
import math
import multiprocessing
import os
import sys
import traceback

import torch



def _tiny_models():
    """This folder's conftest.py, loaded by path under a name of its own (its tiny models and loops; it also
    points Triton at its interpreter). By path: ``import conftest`` may find another folder's."""
    spec = importlib.util.spec_from_file_location("liteattn_tiny_models",
                                                  os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                               "conftest.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tiny = _tiny_models()

CANNOT_START = 3
COLLECTIVE_TIMEOUT_S = 120
SHARPEN, MODEL_SEED = 30.0, 5  # a model whose attention gives liteattn tiles to skip in both halves of the keys
THRESHOLD = -3.0
NO_SKIP = -1e30  # marks nothing, through liteattn
STEPS, LOOP_SEED = 3, 2
TILES = (16, 16)  # WAN_LATENT: 160 tokens, 10 tiles; 5 per rank with two ranks

# The op-level ring: one attention call per step on inputs with spatial locality (tokens attend near themselves).
OP_SHAPE = (1, 128, 2, 16)  # (B, S, H, D): 8 key tiles, 4 per chunk
OP_STEPS, OP_THRESHOLD, OP_SEED = 3, -4.0, 7
KERNEL_STEPS = 2  # the Triton interpreter is slow


# ---------------------------------------------------------------------------- shared with the test
def snapshot(handle) -> dict:
    """Every skip state of the patched layers: ``{(layer, context, part or None): (counts, indices)}``."""
    states = {}
    for layer, runtime in handle.layer_runtimes().items():
        for key, context_state in runtime.contexts.items():
            state = context_state.attention.state
            if state is not None:
                context, part = (key, None) if isinstance(key, str) else key
                states[(layer, context, part)] = (state.kv_num_blocks.clone(), state.kv_indices.clone())
    return states


def record_states(model, handle) -> list:
    """A list that gets :func:`snapshot` after every transformer forward."""
    snapshots: list = []
    model.register_forward_hook(lambda module, args, output: snapshots.append(snapshot(handle)))
    return snapshots


def op_inputs() -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """BSHD float64 ``(q, k, v)`` of each step: shared smooth positional features, so that key tiles far from a
    query tile score far below the near ones, drifting a little from step to step like a denoising run."""
    bsz, seq, heads, dim = OP_SHAPE
    gen = torch.Generator().manual_seed(OP_SEED)
    pos = torch.arange(seq, dtype=torch.float64)[:, None]
    freqs = torch.tensor([0.02, 0.05, 0.09, 0.13], dtype=torch.float64) * math.pi
    features = torch.cat([torch.sin(pos * freqs), torch.cos(pos * freqs)], dim=-1)  # [S, 8]
    features = torch.cat([features, features], dim=-1)[None, :, None, :].expand(bsz, seq, heads, dim) * 2.5

    def noisy(scale):
        return torch.randn(bsz, seq, heads, dim, generator=gen, dtype=torch.float64) * scale

    q, k, v = features + noisy(0.3), features + noisy(0.3), noisy(1.0)
    drift_q, drift_k = noisy(0.05), noisy(0.05)
    return [(q + t * drift_q, k + t * drift_k, v) for t in range(OP_STEPS)]


def empty_list_masks(part_chunk: int) -> torch.Tensor:
    """The active tiles ``(B, H, QT, KT)`` injected into one ring chunk's state by the "ring_empty" scenario:
    in head 0, query tile 0 has nothing in chunk 0, tile 1 nothing in either chunk, tile 2 nothing in chunk 1."""
    bsz, seq, heads, _ = OP_SHAPE
    qt = kt = seq // 2 // TILES[0]
    mask = torch.ones(bsz, heads, qt, kt, dtype=torch.bool)
    for tile, chunks in ((0, (0,)), (1, (0, 1)), (2, (1,))):
        if part_chunk in chunks:
            mask[0, 0, tile] = False
    return mask


# ---------------------------------------------------------------------------- scenarios (one rank)
def _enable(model, **degrees) -> None:
    """``model.enable_parallelism`` on a CPU: diffusers 0.42 places a rank on ``rank % device_count()``, which is
    0 without an accelerator, so one device is counted while it runs."""
    from diffusers import ContextParallelConfig

    original = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: 1
    try:
        model.enable_parallelism(config=ContextParallelConfig(**degrees))
    finally:
        torch.accelerator.device_count = original


def _generations(model, handle, count: int) -> dict:
    snapshots = record_states(model, handle)
    result = {"outputs": [], "per_step": [], "snapshots": []}
    for _ in range(count):
        del snapshots[:]
        out, _ = tiny._wan_generate(model, seed=LOOP_SEED, steps=STEPS)
        result["outputs"].append(out)
        result["per_step"].append(handle.summary().per_step())
        result["snapshots"].append(list(snapshots))
    result["fallbacks"] = handle.summary().fallbacks
    return result


def scenario_ulysses(rank: int, world: int) -> dict:
    """Parallelism first, then liteattn; two generations, then one whose first step is dense (the model's own
    backend under the same parallelism)."""
    import liteattn.integrations as li

    model = tiny._wan(dtype=torch.float64, sharpen=SHARPEN, seed=MODEL_SEED)
    _enable(model, ulysses_degree=world)
    handle = li.apply(model, threshold=THRESHOLD, block_size=TILES)
    result = _generations(model, handle, 2)
    handle.remove()
    handle = li.apply(model, threshold=THRESHOLD, block_size=TILES, dense_steps=1)
    result["dense_first"], _ = tiny._wan_generate(model, seed=LOOP_SEED, steps=STEPS)
    result["dense_first_per_step"] = handle.summary().per_step()
    return result


def scenario_ring(rank: int, world: int) -> dict:
    """liteattn first, then parallelism; two generations, then one that marks nothing."""
    import liteattn.integrations as li

    model = tiny._wan(dtype=torch.float64, sharpen=SHARPEN, seed=MODEL_SEED)
    handle = li.apply(model, threshold=THRESHOLD, block_size=TILES)
    _enable(model, ring_degree=world)
    result = _generations(model, handle, 2)
    handle.remove()
    li.apply(model, threshold=NO_SKIP, block_size=TILES)
    result["no_skip"], _ = tiny._wan_generate(model, seed=LOOP_SEED, steps=STEPS)
    return result


def scenario_unified(rank: int, world: int) -> dict:
    """Ring of 2 x Ulysses of world / 2: one generation that skips, one that marks nothing."""
    import liteattn.integrations as li

    model = tiny._wan(dtype=torch.float64, sharpen=SHARPEN, seed=MODEL_SEED)
    _enable(model, ring_degree=2, ulysses_degree=world // 2)
    handle = li.apply(model, threshold=THRESHOLD, block_size=TILES)
    result = _generations(model, handle, 1)
    handle.remove()
    li.apply(model, threshold=NO_SKIP, block_size=TILES)
    result["no_skip"], _ = tiny._wan_generate(model, seed=LOOP_SEED, steps=STEPS)
    return result


def _op_runtime(threshold: float, backend: str = "torch"):
    from collections import Counter

    from liteattn.integrations import LiteAttentionConfig
    from liteattn.integrations.layer import KeyPaddingMasks, LayerRuntime

    def no_dense(*args, **kwargs):
        raise AssertionError("a context-parallel call ran dense")

    config = LiteAttentionConfig(threshold=threshold, block_size=TILES, backend=backend)
    return LayerRuntime("layer", config, None, no_dense, KeyPaddingMasks(), Counter())


def _parallel_config(rank: int, world: int, ring: int, ulysses: int):
    """A ParallelConfig set up as ``enable_parallelism`` sets one up, for calls made without a model."""
    from diffusers.models._modeling_parallel import ContextParallelConfig, ParallelConfig
    from torch.distributed.device_mesh import init_device_mesh

    config = ParallelConfig(context_parallel_config=ContextParallelConfig(ring_degree=ring, ulysses_degree=ulysses))
    mesh = init_device_mesh("cpu", (ring, ulysses), mesh_dim_names=("ring", "ulysses"))
    config.setup(rank, world, torch.device("cpu"), mesh=mesh)
    return config


def _ring_config(rank: int, world: int):
    return _parallel_config(rank, world, world, 1)


def _ulysses_config(rank: int, world: int):
    return _parallel_config(rank, world, 1, world)


def _shard(x: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    return x.chunk(world, dim=1)[rank].contiguous()


def scenario_ring_op(rank: int, world: int) -> dict:
    """One layer's calls over OP_STEPS steps, straight through ``LayerRuntime.attend`` under ring."""
    from liteattn.integrations.layer import ForwardInfo

    config, runtime = _ring_config(rank, world), _op_runtime(OP_THRESHOLD)
    result = {"outputs": [], "states": [], "sparsity": []}
    for step, (q, k, v) in enumerate(op_inputs()):
        runtime.enter(ForwardInfo("cond", step, 0), None)
        out = runtime.attend(*(_shard(x, rank, world) for x in (q, k, v)), parallel_config=config)
        runtime.exit()
        result["outputs"].append(out)
        result["states"].append({key[1]: (s.attention.state.kv_num_blocks.clone(), s.attention.state.kv_indices.clone())
                                 for key, s in runtime.contexts.items() if not isinstance(key, str)})
        result["sparsity"].append(float(runtime.contexts["cond"].records[-1].sparsity))
    return result


def scenario_kernel(rank: int, world: int) -> dict:
    """Ring and Ulysses calls through the Triton kernel (float16; Triton's interpreter on a CPU) and through the
    PyTorch reference, over KERNEL_STEPS steps of the op-level inputs: outputs and skipped fractions of both."""
    from liteattn.integrations.layer import ForwardInfo

    result = {}
    for layout in ("ring", "ulysses"):
        config = _ring_config(rank, world) if layout == "ring" else _ulysses_config(rank, world)
        for backend in ("torch", "triton"):
            runtime = _op_runtime(OP_THRESHOLD, backend)
            outputs = []
            for step, (q, k, v) in enumerate(op_inputs()[:KERNEL_STEPS]):
                runtime.enter(ForwardInfo("cond", step, 0), None)
                outputs.append(runtime.attend(*(_shard(x.half(), rank, world) for x in (q, k, v)),
                                              parallel_config=config))
                runtime.exit()
            result[layout, backend] = (outputs, [float(r.sparsity) for r in runtime.contexts["cond"].records])
    return result


def scenario_ring_empty(rank: int, world: int) -> dict:
    """Rows with nothing to attend in one chunk, in both, first or second in the ring's order."""
    from liteattn import SkipState
    from liteattn.integrations.layer import ForwardInfo
    from liteattn.integrations.parallel import parts_of

    config, runtime = _ring_config(rank, world), _op_runtime(NO_SKIP)
    q, k, v = op_inputs()[0]
    seq = q.shape[1] // world
    for part in parts_of(config):
        runtime.state(("cond", part), 0).attention.state = SkipState.from_dense(
            empty_list_masks(part.chunk), seq, seq, *TILES)
    runtime.enter(ForwardInfo("cond", 0, 0), None)
    out = runtime.attend(*(_shard(x, rank, world) for x in (q, k, v)), parallel_config=config)
    runtime.exit()
    return {"output": out}


def scenario_bench(rank: int, world: int) -> dict:
    """The two-GPU benchmark script's context-parallel runs, tiny, on these CPU processes."""
    folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, os.pardir, "lab", "benchmarks")
    sys.path.insert(0, folder)  # the script imports its neighbour wan14b_shape.py, as when it is run
    spec = importlib.util.spec_from_file_location("wan14b_parallel", os.path.join(folder, "wan14b_parallel.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = os.path.join(os.environ["LITEATTN_PARALLEL_OUT"], "bench.json")
    code = bench.main(["--tiny", "--steps", "2", "--force-sparsity", "0.5", "--threshold", "-2", "--no-single",
                       "--parallel", "ulysses", "ring", "--out", out])
    return {"code": code, "out": out}


SCENARIOS = {name[len("scenario_"):]: fn for name, fn in globals().items() if name.startswith("scenario_")}


# ---------------------------------------------------------------------------- processes
def _rank(rank: int, world: int, outdir: str, names: list[str]) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ["LITEATTN_PARALLEL_OUT"] = outdir
    # A bounded wait: a rank left alone in a collective (its peer failed) errors out instead of hanging the test.
    try:
        dist.init_process_group("gloo", init_method="file://" + os.path.join(outdir, "store"), rank=rank,
                                world_size=world, timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    except Exception:  # noqa: BLE001 - gloo cannot work here (no usable network interface, say): the tests skip
        with open(os.path.join(outdir, f"cannot-start-{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        return
    try:
        for name in names:
            try:
                result = SCENARIOS[name](rank, world)
            except Exception:  # noqa: BLE001 - the test reports it; the other scenarios still run
                result = {"error": traceback.format_exc()}
            torch.save(result, os.path.join(outdir, f"{name}-{rank}.pt"))
            dist.barrier()  # a rank whose scenario failed early must not start the next one's collectives alone
    finally:
        dist.destroy_process_group()


def main(argv: list[str]) -> int:
    import torch.distributed as dist
    import torch.multiprocessing as mp

    world, outdir, names = int(argv[0]), argv[1], argv[2:]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise ValueError(f"scenarios: expected names from {sorted(SCENARIOS)}, got {unknown}")
    if not (dist.is_available() and dist.is_gloo_available()):
        print("torch.distributed with gloo is not available here", file=sys.stderr)
        return CANNOT_START
    # Forked after the heavy imports, the ranks share them instead of importing torch and diffusers again each.
    import diffusers
    import liteattn.integrations.diffusers  # noqa: F401
    import liteattn.integrations.parallel  # noqa: F401

    diffusers.WanTransformer3DModel, diffusers.ContextParallelConfig  # noqa: B018 - resolves the lazy imports
    start_method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    try:
        context = mp.start_processes(_rank, args=(world, outdir, names), nprocs=world, join=False,
                                     start_method=start_method)
    except OSError as err:  # no process can be started here (e.g. a sandbox without semaphores)
        print(f"cannot start processes: {err}", file=sys.stderr)
        return CANNOT_START
    while not context.join():
        pass
    failed = sorted(f for f in os.listdir(outdir) if f.startswith("cannot-start-"))
    if failed:
        with open(os.path.join(outdir, failed[0])) as f:
            print(f"gloo cannot start here:\n{f.read()}", file=sys.stderr)
        return CANNOT_START
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
