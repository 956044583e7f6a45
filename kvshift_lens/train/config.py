"""What a training run is: the model config, the task, and the optimisation settings, as one JSON
document (``run.json`` in the run folder) from which the run can be rebuilt and resumed."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from kvshift_lens.config import KVShiftConfig, _check_field_types

DEFAULT_SHIFT_INIT = "uniform"
"""Shift initialisation for models trained from scratch when the spec names none. Measured in
BENCHMARKS.md (induction, 5 seeds): with the default ``shift_lr_scale`` (30) identity, uniform and
normal tie; with ``shift_lr_scale=1`` uniform is by far the fastest, so it is never the slower
choice. The model config's own default stays "identity" (exactly vanilla), which retrofitting
needs."""


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
            coefficients then grow past 1 (they also scale K and V): read them as relative
            weights of the lags, or train with ``shift_param="convex"``.
        weight_decay: AdamW decay on weight matrices only (never biases, norms or shift
            coefficients: decaying coefficients would pull them towards 0, not towards identity).
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
        progress: show a progress bar (rank 0 only).
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
        _check_field_types(self)
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
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("weight_decay and grad_clip must be >= 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        if not 0 < self.target_accuracy <= 1:
            raise ValueError(f"target_accuracy={self.target_accuracy} must be in (0, 1]")
        if self.device != "auto" and not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"device={self.device!r} must be 'auto', 'cpu' or 'cuda[:index]'")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown train setting(s) {unknown}; known: {sorted(known)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d


@dataclass
class RunSpec:
    """Everything that defines a run: ``model`` (KVShiftConfig fields), ``task`` (name and
    keyword arguments for :func:`kvshift_lens.train.tasks.build_task`) and ``train``."""

    model: dict[str, Any]
    task: dict[str, Any]
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        model = dict(self.model)
        model.pop("device", None)
        return {"model": model, "task": dict(self.task), "train": self.train.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunSpec:
        missing = {"model", "task", "train"} - set(d)
        if missing:
            raise ValueError(f"run spec is missing {sorted(missing)}")
        spec = cls(model=dict(d["model"]), task=dict(d["task"]),
                   train=TrainConfig.from_dict(dict(d["train"])))
        # Validate now, not mid-run (d_vocab and n_ctx default to the task's at training time).
        KVShiftConfig.from_dict({"d_vocab": 2, "n_ctx": 1, **spec.model, "device": "cpu"})
        return spec
