"""What a training run is: the model config, the task, and the optimisation settings.

:class:`RunSpec` is what a user writes (dicts for the model and the task, a :class:`TrainConfig`);
:func:`resolve_run_spec` turns it, once, into a :class:`ResolvedRun`: a validated
:class:`~kvshift_lens.KVShiftConfig` with every default filled in (``d_vocab`` and ``n_ctx`` from the
task, the shift initialisation for training from scratch), the built training and evaluation
tasks, and the train settings. The run folder's ``run.json`` is the resolved run's
:meth:`ResolvedRun.to_dict`, so a run can be rebuilt and resumed from it even if defaults change.

This module imports neither torch nor TransformerLens at import time (the command line builds its
flags from :class:`TrainConfig` and must start fast).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kvshift_lens.options import check_field_types

if TYPE_CHECKING:  # pragma: no cover
    from kvshift_lens.config import KVShiftConfig

DEFAULT_SHIFT_INIT = "uniform"
"""Shift initialisation for models trained from scratch when the spec names none. Measured in
BENCHMARKS.md (induction, 5 seeds): with the default ``shift_lr_scale`` (30) identity, uniform and
normal tie; with ``shift_lr_scale=1`` uniform is by far the fastest, so it is never the slower
choice. The model config's own default stays "identity" (exactly vanilla), which retrofitting
needs."""

DEFAULT_SHIFT_PARAM = "gain_mix"
"""Shift parametrisation for models trained from scratch when the spec names none. Measured in
BENCHMARKS.md (induction, KV shift 1 layer, uniform init, ``shift_lr_scale`` 30, 5 seeds): steps
to 90% gain_mix 150 (150-175), free 175 (150-175), convex 200 (200-225); gain_mix is at least as
fast and keeps what a head mixes (on the simplex) apart from how much it scales (its gain). The
model config's own default stays "free" (the paper's equation), which retrofitting uses; the
reproduction and demo specs pin "free", as published."""

SECTIONS = ("model", "task", "train")


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping settings.

    Args:
        steps: optimiser steps.
        batch_size: global batch (split evenly across processes under DDP).
        lr: peak learning rate of AdamW; ``warmup_steps`` linear warm-up, then cosine decay to
            ``lr * min_lr_ratio`` at ``steps``.
        shift_lr_scale: the shift coefficients' learning rate is ``lr * shift_lr_scale``. Adam
            moves every parameter by about ``lr`` per step whatever its scale; weights start at
            ``init_range`` (0.02) while coefficients live on a scale of 1, so at equal ``lr`` a
            coefficient needs ~1/lr steps to travel from 0 to 1. 30 is measured in BENCHMARKS.md:
            steps to 90% induction 300 -> 175 (uniform init), 750 -> 175 (identity). Free
            coefficients then grow past 1 (they also scale K and V): read them as a gain times a
            mix over lags (:func:`kvshift_lens.shift.gain_and_mix`). With ``shift_param="gain_mix"``
            (:data:`DEFAULT_SHIFT_PARAM`) the scale applies to both the mixes and the per-head
            gains; the mixes stay on the simplex, only the gains grow (to ~4 on induction).
        weight_decay: AdamW decay on weight matrices only (never biases, norms or shift
            coefficients: decaying coefficients would pull them towards 0, not towards identity).
        betas: AdamW betas, each in [0, 1).
        grad_clip: max global gradient norm (0 disables).
        eval_every: evaluate (task metrics + shift coefficients) every N steps and at the end.
        eval_batches: batches per evaluation, drawn from a fixed evaluation generator so every
            evaluation sees the same data.
        checkpoint_every: write a resumable checkpoint every N steps (0: only at the end).
        keep_checkpoints: how many step checkpoints to keep (oldest deleted first).
        seed: seeds the model initialisation, data and evaluation generators.
        device: "auto" (cuda when available), "cpu" or "cuda[:i]".
        bf16: autocast to bfloat16 on CUDA (ignored on CPU, where it would only slow things down).
        compile: wrap the model in ``torch.compile``.
        target_accuracy: report the first evaluated step whose accuracy reaches this.
        stop_at_target: end training once ``target_accuracy`` is reached.
        log_every: write the training loss to metrics.jsonl every N steps.
        progress: show a progress bar (rank 0 only, and only on a terminal).
    """

    steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.01
    shift_lr_scale: float = 30.0
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 50
    eval_batches: int = 4
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    seed: int = 0
    device: str = "auto"
    bf16: bool = True
    compile: bool = False
    target_accuracy: float = 0.9
    stop_at_target: bool = False
    log_every: int = 10
    progress: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.betas, list):
            self.betas = tuple(self.betas)
        check_field_types(self)
        for name in ("steps", "batch_size", "eval_every", "eval_batches", "log_every",
                     "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        for name in ("warmup_steps", "checkpoint_every", "seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr} must be > 0")
        if not self.shift_lr_scale > 0:
            raise ValueError(f"shift_lr_scale={self.shift_lr_scale} must be > 0")
        for name in ("weight_decay", "grad_clip"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas={list(self.betas)} must be two numbers in [0, 1)")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        if not 0 < self.target_accuracy <= 1:
            raise ValueError(f"target_accuracy={self.target_accuracy} must be in (0, 1]")
        if self.device != "auto" and not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"device={self.device!r} must be 'auto', 'cpu' or 'cuda[:index]'")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainConfig:
        if not isinstance(d, Mapping):
            raise TypeError(f"train settings must be a dict, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown train setting(s) {unknown}; known: {sorted(known)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d


EXECUTION_ONLY = ("progress", "device", "compile", "bf16", "log_every", "checkpoint_every",
                  "keep_checkpoints")
"""Train settings that change how a run executes but not what it computes: a resume may change
them."""


@dataclass
class RunSpec:
    """Everything that defines a run, as a user writes it: ``model`` (KVShiftConfig fields;
    ``d_vocab`` and ``n_ctx`` default to the task's), ``task`` (``name`` and keyword arguments for
    :func:`kvshift_lens.train.tasks.build_task`) and ``train``."""

    model: dict[str, Any]
    task: dict[str, Any]
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        model = dict(self.model)
        model.pop("device", None)
        return {"model": model, "task": dict(self.task), "train": self.train.to_dict()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RunSpec:
        """Check the structure (sections, their types, the train settings); the model and the
        task are checked by :func:`resolve_run_spec`."""
        if not isinstance(d, Mapping):
            raise TypeError(f"a run spec must be a dict, got {type(d).__name__}")
        unknown = sorted(set(d) - set(SECTIONS))
        if unknown:
            raise ValueError(f"unknown run spec section(s) {unknown}; the sections are "
                             f"{list(SECTIONS)}")
        if "task" not in d:
            raise ValueError("the run spec has no 'task'")
        for name in SECTIONS:
            if not isinstance(d.get(name, {}), Mapping):
                raise TypeError(f"run spec section {name!r} must be a dict, got "
                                f"{type(d[name]).__name__}")
        return cls(model=dict(d.get("model", {})), task=dict(d["task"]),
                   train=TrainConfig.from_dict(dict(d.get("train", {}))))


@dataclass
class ResolvedRun:
    """A run spec resolved once (:func:`resolve_run_spec`): the typed, validated pieces."""

    model: KVShiftConfig
    task_spec: dict[str, Any]
    train: TrainConfig
    task: Any
    eval_task: Any

    def to_dict(self) -> dict[str, Any]:
        """``run.json``: the full model config (every field), the task spec, the train settings."""
        return {"model": self.model.to_dict(), "task": dict(self.task_spec),
                "train": self.train.to_dict()}

    def comparable(self) -> dict[str, Any]:
        """:meth:`to_dict` without the settings a resume may change (:data:`EXECUTION_ONLY`)."""
        d = self.to_dict()
        d["train"] = {k: v for k, v in d["train"].items() if k not in EXECUTION_ONLY}
        return d


def resolve_run_spec(
    spec: RunSpec | Mapping[str, Any], model_config: KVShiftConfig | None = None
) -> ResolvedRun:
    """Complete and validate a run spec, building its tasks, before anything is written.

    Fills ``model.d_vocab`` (the task's vocabulary, or its tokenizer's for text), ``model.n_ctx``
    (the task's ``seq_len``), ``model.shift_init`` (:data:`DEFAULT_SHIFT_INIT`) and
    ``model.shift_param`` (:data:`DEFAULT_SHIFT_PARAM`). When training a
    given model (``model_config`` is its config, e.g. a retrofitted model's), the model's config
    fills every field the spec leaves out, and a field the spec sets differently is an error.
    Does not change ``spec``.

    Raises:
        ValueError, TypeError: naming the section, field and value (an unknown task or
            parameter, a model that cannot represent the task's tokens or length, a spec that
            contradicts the given model, ...).
    """
    from kvshift_lens.config import KVShiftConfig
    from kvshift_lens.train.tasks import build_tasks

    if not isinstance(spec, RunSpec):
        spec = RunSpec.from_dict(spec)
    task_spec = dict(spec.task)
    task, eval_task = build_tasks(task_spec)
    model = {k: v for k, v in spec.model.items() if k != "device"}
    if model_config is not None:
        given = model_config.to_dict()
        clash = sorted(k for k, v in model.items() if k in given and given[k] != v)
        if clash:
            raise ValueError(
                f"the spec's model sets {', '.join(f'{k}={model[k]!r}' for k in clash)} but the "
                f"model to train has {', '.join(f'{k}={given[k]!r}' for k in clash)}")
        model = {**given, **model}
    model.setdefault("d_vocab", task.d_vocab)
    model.setdefault("n_ctx", task.seq_len)
    model.setdefault("shift_init", DEFAULT_SHIFT_INIT)
    model.setdefault("shift_param", DEFAULT_SHIFT_PARAM)
    d_vocab, n_ctx = model["d_vocab"], model["n_ctx"]
    if isinstance(d_vocab, int) and d_vocab < task.d_vocab:
        raise ValueError(
            f"model d_vocab={d_vocab} is smaller than task {task_spec.get('name')!r} "
            f"d_vocab={task.d_vocab}; the model cannot represent the task's tokens")
    if isinstance(n_ctx, int) and n_ctx < task.seq_len:
        raise ValueError(f"model n_ctx={n_ctx} is shorter than the task's seq_len={task.seq_len}")
    config = KVShiftConfig.from_dict({**model, "device": "cpu"})
    return ResolvedRun(model=config, task_spec=task_spec, train=spec.train, task=task,
                       eval_task=eval_task)


__all__ = ["DEFAULT_SHIFT_INIT", "DEFAULT_SHIFT_PARAM", "EXECUTION_ONLY", "ResolvedRun", "RunSpec",
           "TrainConfig", "resolve_run_spec"]
