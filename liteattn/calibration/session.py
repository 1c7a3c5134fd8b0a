"""A calibration session: dense references, evaluations of candidate settings, and the journal that makes it resumable.

Why a journal: an evaluation generates every calibration input once more
(minutes to hours on a real model), and a search makes dozens. Each finished
evaluation is written to ``work_dir/journal.json`` (atomically) under a
canonical key of its setting, and the dense outputs to ``dense-*.pt``. The
searches are deterministic functions of the evaluations' results, so a
resumed calibration replays the same path, finds every evaluation already
made in the journal, and continues where the interrupted one stopped. A
journal written for another model (its configuration or its weights),
runner or input set is refused rather than mixed in; one journal serves calibrations for several budgets of the
same inputs (an evaluation does not depend on the budget).

Why every evaluation goes through a profile and :func:`liteattn.apply`:
what is measured is exactly what a user of the profile runs.
"""
from __future__ import annotations

import hashlib
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from .budget import METRICS, Budget
from ..profile import ModelBinding, Profile, model_binding, write_json_atomic
from .runners import Runner

__all__ = ["Calibration", "Setting", "fidelity", "weights_digest"]

JOURNAL = "journal.json"
_DIGEST_TENSORS, _DIGEST_VALUES = 8, 1024


def weights_digest(model) -> str:
    """A fingerprint of ``model``'s weights from a strided sample of up to 8 parameter tensors spread over it.

    Why a sample: a journal must not mix evaluations of two checkpoints of one architecture (a fine-tune, another
    release), and hashing every weight of a 14B-parameter model would cost more than a generation. A fine-tune
    or a merged LoRA changes nearly every value of the tensors it touches, so the sample sees it.
    """
    params = [p for p in model.parameters() if p.device.type != "meta"] if isinstance(model, torch.nn.Module) else []
    if not params:
        return "none"
    digest = hashlib.sha256()
    picks = sorted({round(i * (len(params) - 1) / (_DIGEST_TENSORS - 1)) for i in range(_DIGEST_TENSORS)})
    for i in picks:
        flat = params[i].detach().reshape(-1)
        sample = flat[::max(1, flat.numel() // _DIGEST_VALUES)][:_DIGEST_VALUES].float().cpu()
        digest.update(repr(tuple(params[i].shape)).encode())
        digest.update(sample.numpy().tobytes())
    return "sha256:" + digest.hexdigest()[:32]


@dataclass(frozen=True)
class Setting:
    """A candidate: dense first steps, step ranges, one threshold per layer and range, the skip rule."""

    dense_steps: int
    range_starts: tuple[int, ...]
    thresholds: tuple[tuple[str, tuple[float, ...]], ...]  # (layer, per-range thresholds), in layer order
    skip_rule: str = "carry"

    @classmethod
    def uniform(cls, layers: Sequence[str], dense_steps: int, range_starts: Sequence[int], threshold: float,
                skip_rule: str = "carry") -> "Setting":
        row = tuple(float(threshold) for _ in range_starts)
        return cls(dense_steps, tuple(range_starts), tuple((layer, row) for layer in layers), skip_rule)

    def table(self) -> dict[str, tuple[float, ...]]:
        return dict(self.thresholds)

    def with_threshold(self, layer: str, range_index: int, threshold: float) -> "Setting":
        rows = tuple((name, row[:range_index] + (float(threshold),) + row[range_index + 1:]) if name == layer
                     else (name, row) for name, row in self.thresholds)
        return Setting(self.dense_steps, self.range_starts, rows, self.skip_rule)

    def key(self) -> str:
        """Canonical text: equal settings, equal keys (the journal's index)."""
        rows = [[name, [("-inf" if t == -math.inf else round(t, 6)) for t in row]] for name, row in self.thresholds]
        return json.dumps([self.dense_steps, list(self.range_starts), rows, self.skip_rule], separators=(",", ":"))

    def describe(self) -> str:
        values = sorted({t for _, row in self.thresholds for t in row})
        spread = f"{values[0]:g}" if len(values) == 1 else f"{values[0]:g}..{values[-1]:g}"
        return f"{self.dense_steps} dense, thresholds {spread}"


def _to_unit(x: torch.Tensor, value_range: tuple[float, float]) -> torch.Tensor:
    """Outputs mapped to [-1, 1] (the range the PSNR/SSIM of liteattn.testbed.metrics take), as (1, A, B, H, W)."""
    low, high = value_range
    x = (x.double() - low) / max(high - low, 1e-12) * 2 - 1
    if x.dim() == 3:  # an image (C, H, W)
        x = x[:, None]
    if x.dim() != 4:
        x = x.reshape(1, 1, 1, -1)
    return x[None]


# What a non-finite measurement is recorded as: a value every budget of its metric misses (JSON has no NaN).
MISSED = {"psnr": 0.0, "ssim": -1.0, "rel_error": 1e9}


def fidelity(output: torch.Tensor, dense: torch.Tensor, value_range: tuple[float, float] | None) -> dict:
    """PSNR (dB) and SSIM (None when the frames are too small) of one output against its dense output, both mapped
    from ``value_range`` (default: the dense output's own range) to [-1, 1], and the relative L2 error
    ``|output - dense| / |dense|`` of the outputs as they are. A non-finite measurement (NaN in the output) is
    recorded as :data:`MISSED`."""
    from ..testbed.metrics import psnr, ssim

    if value_range is None:
        value_range = (float(dense.min()), float(dense.max()))
    x, ref = _to_unit(output, value_range), _to_unit(dense, value_range)
    value = psnr(x, ref)
    try:
        structure = ssim(x, ref) if min(x.shape[-2:]) >= 11 else None
    except ValueError:
        structure = None
    diff, norm = float((output.double() - dense.double()).norm()), float(dense.double().norm())
    rel = diff / norm if norm else (0.0 if diff == 0 else MISSED["rel_error"])
    # Identical outputs give +inf dB (capped); a NaN anywhere must count as a miss, never as a perfect score.
    return {"psnr": 99.0 if value == math.inf else (value if math.isfinite(value) else MISSED["psnr"]),
            "ssim": structure if structure is None or math.isfinite(structure) else MISSED["ssim"],
            "rel_error": rel if math.isfinite(rel) else MISSED["rel_error"]}


class Calibration:
    """One model, one set of calibration inputs, one budget: evaluates settings and remembers what it measured.

    Args:
        runner: how inputs become outputs (:mod:`liteattn.calibration.runners`).
        inputs: the calibration inputs.
        budget: the :class:`Budget`.
        work_dir: where the journal and dense outputs are kept (None: in memory only, not resumable).
        resume: continue a journal found in ``work_dir`` (else start it over).
        block_size, backend: passed to :class:`~liteattn.integrations.LiteAttentionConfig`.
        show_progress: progress bars for every generation.
        log: where one line per evaluation goes (default: stderr).
    """

    def __init__(self, runner: Runner, inputs: Sequence, budget: Budget, work_dir=None,
                 resume: bool = True, block_size=None, backend: str = "auto", show_progress: bool = True,
                 log: Callable[[str], None] | None = None) -> None:
        from ..integrations import LiteAttentionConfig, apply, remove

        self.runner, self.inputs, self.budget = runner, list(inputs), budget
        if not self.inputs:
            raise ValueError("inputs: expected at least one calibration input")
        self.block_size, self.backend, self.show_progress = block_size, backend, show_progress
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        LiteAttentionConfig(block_size=block_size, backend=backend)  # bad values fail here, before any work
        handle = apply(runner.target, threshold=-math.inf, block_size=block_size, backend=backend)
        try:
            patched = handle.patched()
        finally:
            remove(runner.target)
        self.bindings: dict[str, ModelBinding] = {label: model_binding(model, names)
                                                  for label, (model, names) in patched.items()}
        self.layers = [Profile.layer_key(label, name) for label, b in self.bindings.items() for name in b.layers]
        from ..kernels import default_block_sizes

        head_dim = next(iter(self.bindings.values())).head_dim
        self.tiles = tuple(block_size) if block_size is not None else default_block_sizes(head_dim)
        # What decides an evaluation's result (not the budget or the search, which only choose what to evaluate:
        # calibrations for several budgets on the same inputs share one journal).
        self.header = {
            "model": {label: b.to_dict() for label, b in self.bindings.items()},
            "weights": {label: weights_digest(model) for label, (model, _) in patched.items()},
            "runner": runner.fingerprint(), "inputs": runner.describe(self.inputs), "tiles": list(self.tiles),
            "backend": backend,
        }
        self.work_dir = Path(work_dir) if work_dir is not None else None
        self.journal = {"header": self.header, "steps": None, "tokens": None, "evaluations": {}, "marginal": {}}
        self._dense: dict[str, torch.Tensor] = {}
        self._dense_scores: dict[int, list] = {}  # by id of a dense output kept in self._dense
        self.evaluations = 0  # made in this session (not found in the journal)
        self._fallbacks_reported = False
        if self.work_dir is not None:
            self._open_journal(resume)
        if self.journal["tokens"] is None and getattr(runner, "tokens", None):
            self.journal["tokens"] = int(runner.tokens)

    # -- journal ---------------------------------------------------------------------------
    def _open_journal(self, resume: bool) -> None:
        path = self.work_dir / JOURNAL
        if not resume:  # starting over means every output is made again, the dense ones too
            for stale in self.work_dir.glob("dense-*.pt"):
                stale.unlink()
        if resume and path.is_file():
            try:
                journal = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as err:
                raise ValueError(f"work_dir: {str(path)!r} is not a readable calibration journal ({err}); pass "
                                 "resume=False to start over") from None
            old = journal.get("header", {})
            differs = [k for k in sorted(set(old) | set(self.header))
                       if json.dumps(old.get(k), sort_keys=True) != json.dumps(self.header.get(k), sort_keys=True)]
            if differs:
                raise ValueError(f"work_dir: the journal in {str(self.work_dir)!r} was written for another calibration "
                                 f"({', '.join(differs)} differ); use another work_dir, or resume=False to start "
                                 "over")
            self.journal = journal
            found = len(journal.get("evaluations", {}))
            if found:
                self.log(f"calibrate: resuming, {found} evaluations found in {path}")
        self._save()

    def _save(self) -> None:
        if self.work_dir is not None:
            write_json_atomic(self.work_dir / JOURNAL, self.journal)

    # -- generations -------------------------------------------------------------------------
    def _chunks(self, inputs: Sequence):
        size = max(1, int(self.runner.batch_size))
        return [list(inputs[i:i + size]) for i in range(0, len(inputs), size)]

    def dense(self, inputs: Sequence | None = None, tag: str = "calibration") -> torch.Tensor:
        """The dense outputs of ``inputs`` (default: the calibration inputs), made once and kept in ``work_dir``."""
        from ..integrations import apply, remove

        inputs = self.inputs if inputs is None else list(inputs)
        digest = hashlib.sha256(json.dumps([self.header["model"], self.header["runner"],
                                            self.runner.describe(inputs)], sort_keys=True).encode()).hexdigest()[:16]
        if digest in self._dense:
            return self._dense[digest]
        path = self.work_dir / f"dense-{digest}.pt" if self.work_dir is not None else None
        if path is not None and path.is_file():
            saved = torch.load(path, weights_only=True)
            self._dense[digest] = saved["outputs"]
            self._record_steps(saved["steps"], tag)
            return self._dense[digest]
        outputs, steps = [], None
        for chunk in self._chunks(inputs):
            handle = apply(self.runner.target, threshold=-math.inf, block_size=self.block_size, backend=self.backend)
            try:  # the dense run goes through the same patch (stock attention at every call) and counts the steps
                outputs.append(self.runner.generate(chunk, self.show_progress, f"dense ({tag})"))
                steps = len(handle.summary().per_step())
            finally:
                remove(self.runner.target)
        self._record_steps(steps, tag)
        result = torch.cat(outputs)
        if path is not None:
            tmp = path.with_suffix(".tmp")
            torch.save({"outputs": result, "steps": steps}, tmp)
            tmp.replace(path)
        self._dense[digest] = result
        return result

    def _record_steps(self, steps: int, tag: str) -> None:
        if self.journal["steps"] is None and tag == "calibration":
            self.journal["steps"] = steps
            self._save()

    @property
    def steps(self) -> int:
        """Denoising steps per generation (counted in the dense run)."""
        if self.journal["steps"] is None:
            self.dense()
        return int(self.journal["steps"])

    @property
    def tokens(self) -> int | None:
        """The self-attention sequence length (seen in the first sparse evaluation), None before."""
        return self.journal["tokens"]

    def profile(self, setting: Setting, token_rule: str = "same", **extra) -> Profile:
        """``setting`` as a :class:`Profile` bound to this model."""
        return Profile(models=self.bindings, tiles=self.tiles, tokens=self.tokens or 1, token_rule=token_rule,
                       steps=self.steps, dense_steps=setting.dense_steps, range_starts=setting.range_starts,
                       thresholds=setting.table(), skip_rule=setting.skip_rule, **extra)

    def run(self, config, inputs: Sequence, desc: str, steer: Callable | None = None,
            per_input: bool = False) -> tuple[torch.Tensor, dict]:
        """Generate ``inputs`` with liteattn applied as ``config``; ``(outputs, sparsity)``.

        ``sparsity``: ``{"run": mean over every attention call, "layers": {layer: mean}}``, weighted by inputs.
        ``steer``: set on every layer (see :class:`~liteattn.integrations.layer.LayerRuntime`) after the token
        count is recorded. ``per_input``: one input per generation.
        """
        from ..integrations import apply, remove

        tokens: set[int] = set()

        def record(runtime, info, attention, q, k, v, scale, must_do, threshold):
            tokens.add(int(q.shape[1]))
            return threshold if steer is None else steer(runtime, info, attention, q, k, v, scale, must_do, threshold)

        outputs, run_sum, layer_sum, count = [], 0.0, {}, 0
        chunks = [[x] for x in inputs] if per_input else self._chunks(list(inputs))
        for chunk in chunks:
            handle = apply(self.runner.target, config=config)
            try:
                for runtime in handle.layer_runtimes().values():
                    runtime.steer = record
                outputs.append(self.runner.generate(chunk, self.show_progress, desc))
                summary = handle.summary()
            finally:
                remove(self.runner.target)
            self._check_fallbacks(summary, config)
            n = len(chunk)
            run_sum += summary.sparsity * n
            per_layer: dict[str, list[float]] = {}  # keyed as the profile keys layers, however many transformers ran
            for call in summary.calls:
                per_layer.setdefault(Profile.layer_key(call.transformer, call.layer), []).append(call.sparsity)
            for layer, values in per_layer.items():
                layer_sum[layer] = layer_sum.get(layer, 0.0) + sum(values) / len(values) * n
            count += n
        if len(tokens) > 1:
            raise ValueError(f"inputs: expected one self-attention sequence length, got {sorted(tokens)}; calibrate "
                             "one resolution at a time")
        if tokens and self.journal["tokens"] is None:
            self.journal["tokens"] = tokens.pop()
            self._save()
        return torch.cat(outputs), {"run": run_sum / count, "layers": {k: v / count for k, v in layer_sum.items()}}

    def _check_fallbacks(self, summary, config) -> None:
        """Refuse a run whose attention calls all fell back to dense (nothing was measured: every setting would
        look perfect and the search would return the most aggressive one); report one where some did."""
        if not summary.fallbacks or config.threshold == -math.inf:
            return
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(summary.fallbacks.items()))
        if all(c.mode != "sparse" for c in summary.calls):
            raise ValueError(f"pipe_or_transformer: every attention call ran dense instead of liteattn ({reasons}); "
                             "a calibration measures nothing there (context parallelism and masked attention are "
                             "not calibrated)")
        if not self._fallbacks_reported:
            self._fallbacks_reported = True
            self.log(f"calibrate: some attention calls run dense and are not calibrated ({reasons})")

    def measure(self, config, inputs: Sequence | None = None, tag: str = "calibration", scores: bool = True,
                steer: Callable | None = None, per_input: bool = False) -> dict:
        """Sparsity and fidelity (per input, worst, mean) of ``config`` on ``inputs``, and the runner's quality
        scores of each output and of its dense output (the testbed's evaluator: a fraction of a second a video)."""
        inputs = self.inputs if inputs is None else list(inputs)
        dense = self.dense(inputs, tag)
        outputs, sparsity = self.run(config, inputs, f"sparse ({tag})", steer, per_input)
        per_input_fidelity = [fidelity(o, d, self.runner.value_range) for o, d in zip(outputs, dense)]
        result = {"sparsity": sparsity["run"], "sparsity_per_layer": sparsity["layers"],
                  "per_input": per_input_fidelity}
        for metric in ("psnr", "ssim", "rel_error"):
            values = [f[metric] for f in per_input_fidelity if f[metric] is not None]
            if values:
                result[f"{metric}_worst"] = min(values) if METRICS[metric][1] > 0 else max(values)
                result[f"{metric}_mean"] = sum(values) / len(values)
        if scores:
            per_video = self.runner.score(outputs, inputs)
            if per_video is not None:
                result["scores"] = per_video
                key = id(dense)
                if key not in self._dense_scores:
                    self._dense_scores[key] = self.runner.score(dense, inputs)
                result["dense_scores"] = self._dense_scores[key]
        return result

    def evaluate(self, setting: Setting) -> dict:
        """:meth:`measure` of ``setting`` on the calibration inputs, from the journal when it was made before."""
        from ..integrations import LiteAttentionConfig

        key = setting.key()
        found = self.journal["evaluations"].get(key)
        if found is not None:
            return found
        config = LiteAttentionConfig(profile=self.profile(setting), block_size=self.block_size, backend=self.backend,
                                     skip_rule=setting.skip_rule)
        result = self.measure(config)
        self.journal["evaluations"][key] = result
        self.evaluations += 1
        self._save()
        return result

    def value(self, result: dict) -> float:
        """The budget's metric as it bounds it, the mean or the worst input (fidelity budgets)."""
        return result[f"{self.budget.metric}_{self.budget.aggregate}"]
