"""One trainer for synthetic tasks and text: AdamW, warm-up + cosine, clipping, evaluation with the
task's metrics and the shift coefficients, JSONL metrics, atomic resumable checkpoints, a NaN guard,
and data parallelism through ``torchrun``.

Run folder::

    run.json           the RunSpec (model, task, train): enough to rebuild and resume the run
    metrics.jsonl      one JSON object per line: {"step", "kind": "train"|"eval", ...}
    checkpoints/       step_XXXXXXXX/ (model + optimiser + RNG + data position), latest
    final/             the final model (save_pretrained), when training finishes

Determinism: every random draw comes from explicit generators (model init, data, evaluation) whose
states are checkpointed, so ``resume`` continues bit-identically on CPU. Under DDP every process
draws the same global batch and trains on its slice; the loss is normalised by the global number of
predicted tokens, so gradients and logged losses equal a single process's on the same global batch.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from kvshift_lens.checkpoint import CheckpointError
from kvshift_lens.config import KVShiftConfig
from kvshift_lens.data.tasks import IGNORE_INDEX
from kvshift_lens.model import HookedKVShiftTransformer
from kvshift_lens.train import distributed as dist_utils
from kvshift_lens.train.config import DEFAULT_SHIFT_INIT, RunSpec
from kvshift_lens.train.state import (
    latest_checkpoint,
    load_checkpoint_state,
    restore_generators,
    restore_optimizer,
    save_checkpoint,
)
from kvshift_lens.train.tasks import build_eval_task, build_task

logger = logging.getLogger(__name__)

RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"


class TrainingDiverged(RuntimeError):
    """The loss or gradient norm became NaN/inf; the last good checkpoint is kept."""


class RunFolderError(ValueError):
    """The run folder exists and neither resume nor overwrite was asked for, or does not match."""


@dataclass
class TrainResult:
    """What a finished run reports."""

    run_dir: Path
    steps: int
    final_metrics: dict[str, float]
    steps_to_target: int | None
    tokens_per_second: float
    evals: list[dict[str, Any]] = field(default_factory=list)
    model: HookedKVShiftTransformer | None = None


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} was asked for but CUDA is not available here")
    return torch.device(device)


def _param_groups(model: torch.nn.Module, cfg) -> list[dict[str, Any]]:
    """Weight matrices (decayed), other parameters, and shift coefficients (no decay, their own
    learning-rate scale)."""
    decay, no_decay, shift = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1].lstrip("_")
        if leaf.startswith("shift_"):
            shift.append(p)
        else:
            (decay if leaf.startswith("W_") else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if shift:
        groups.append({"params": shift, "weight_decay": 0.0, "lr": cfg.lr * cfg.shift_lr_scale})
    return groups


def lr_lambda(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the peak learning rate at ``step``: linear warm-up, then cosine decay."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def coefficient_log(model: HookedKVShiftTransformer) -> dict[str, list]:
    """The shift coefficients as nested lists ``[layer][head][lag]`` per shifted projection."""
    return {k: v.tolist() for k, v in model.shift_coefficients().values.items()}


# Settings that change how a run executes but not what it computes: a resume may change them.
_EXECUTION_ONLY = ("progress", "device", "compile", "bf16", "log_every", "checkpoint_every",
                   "keep_checkpoints")


def _comparable(spec_dict: dict[str, Any]) -> dict[str, Any]:
    train = {k: v for k, v in spec_dict.get("train", {}).items() if k not in _EXECUTION_ONLY}
    return {**spec_dict, "train": train}


def _check_run_dir(run_dir: Path, spec: RunSpec, resume: bool, overwrite: bool) -> None:
    run_file = run_dir / RUN_FILE
    if run_dir.exists() and not run_dir.is_dir():
        raise RunFolderError(f"run folder {run_dir} exists and is not a directory")
    if run_dir.exists() and any(run_dir.iterdir()) and not overwrite:
        if resume:
            if not run_file.is_file():
                raise RunFolderError(f"cannot resume: {run_file} is missing")
            saved = _comparable(json.loads(run_file.read_text()))
            new = _comparable(json.loads(json.dumps(spec.to_dict())))
            if saved != new:
                diff = sorted(k for k in saved if saved.get(k) != new.get(k))
                raise RunFolderError(
                    f"cannot resume {run_dir}: its run.json differs from this run in {diff}; "
                    "resume with the same settings or use a new folder"
                )
        else:
            raise RunFolderError(
                f"run folder {run_dir} already exists; pass --resume to continue it or "
                "--overwrite to start again"
            )


def _create_run_dir(run_dir: Path, spec: RunSpec, overwrite: bool) -> None:
    if overwrite and run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / RUN_FILE).write_text(json.dumps(spec.to_dict(), indent=2))


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines written after ``step`` (by a run that died before its next checkpoint),
    so a resumed run's metrics.jsonl equals an uninterrupted run's."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line)["step"] <= step
            and json.loads(line)["kind"] != "summary"]
    path.write_text("".join(line + "\n" for line in keep))


def train(
    spec: RunSpec,
    run_dir: str | Path,
    resume: bool = False,
    overwrite: bool = False,
    model: HookedKVShiftTransformer | None = None,
) -> TrainResult:
    """Train the model described by ``spec`` (or the given ``model``) and write the run folder.

    Args:
        spec: model config, task and training settings.
        run_dir: the run folder (see the module docstring).
        resume: continue from ``checkpoints/latest`` in ``run_dir``.
        overwrite: delete an existing ``run_dir`` first.
        model: an already-built model to train (e.g. a retrofitted one); its config must equal
            ``spec.model``.

    Raises:
        RunFolderError: the folder exists without resume/overwrite, or resume settings differ.
        TrainingDiverged: the loss or gradients became non-finite.
    """
    cfg = spec.train
    run_dir = Path(run_dir)
    ctx = dist_utils.init_from_env(cfg.device)
    is_main = ctx.rank == 0
    device = ctx.device if ctx.world_size > 1 else resolve_device(cfg.device)

    task = build_task(spec.task)
    model_cfg = dict(spec.model)
    model_cfg.setdefault("d_vocab", task.d_vocab)
    model_cfg.setdefault("n_ctx", task.seq_len)
    if model is None:
        model_cfg.setdefault("shift_init", DEFAULT_SHIFT_INIT)
    spec.model = model_cfg
    if model_cfg["d_vocab"] < task.d_vocab:
        raise ValueError(
            f"model d_vocab={model_cfg['d_vocab']} is smaller than task {spec.task.get('name')!r} "
            f"d_vocab={task.d_vocab}; the model cannot represent the task's tokens"
        )
    if "n_ctx" in model_cfg and model_cfg["n_ctx"] < task.seq_len:
        raise ValueError(
            f"model n_ctx={model_cfg['n_ctx']} is shorter than the task's seq_len={task.seq_len}")
    KVShiftConfig.from_dict({**model_cfg, "device": "cpu"})  # a bad config fails before any write
    if cfg.batch_size % ctx.world_size:
        raise ValueError(
            f"batch_size={cfg.batch_size} must be divisible by the number of processes "
            f"({ctx.world_size})")
    _check_run_dir(run_dir, spec, resume, overwrite)  # every process, before anyone writes
    dist_utils.barrier(ctx)
    if is_main:
        _create_run_dir(run_dir, spec, overwrite)
    dist_utils.barrier(ctx)

    init_gen = torch.Generator().manual_seed(cfg.seed)
    if model is None:
        # A text task's tokenizer goes with the model, so checkpoints and final/ carry it.
        model = HookedKVShiftTransformer({**model_cfg, "device": "cpu"}, generator=init_gen,
                                         tokenizer=getattr(task, "tokenizer", None))
    eval_task = build_eval_task(spec.task, task)
    model.to(device).train()
    optimizer = torch.optim.AdamW(_param_groups(model, cfg), lr=cfg.lr,
                                  betas=cfg.betas, fused=device.type == "cuda" or None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio))
    data_gen = torch.Generator().manual_seed(cfg.seed + 1)
    generators = {"data": data_gen}

    metrics_path = run_dir / METRICS_FILE
    start_step, evals, steps_to_target = 0, [], None
    if resume:
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            logger.info("no checkpoint in %s: starting from step 0", run_dir)
        else:
            loaded = HookedKVShiftTransformer.from_pretrained(ckpt, device=str(device))
            model.load_state_dict(loaded.state_dict())
            tensors, meta = load_checkpoint_state(ckpt)
            restore_optimizer(optimizer, tensors, meta)
            scheduler.load_state_dict(meta["scheduler"])
            restore_generators(generators, tensors)
            start_step = meta["step"]
            evals = meta.get("evals", [])
            steps_to_target = meta.get("steps_to_target")
            if is_main:
                _truncate_metrics(metrics_path, start_step)
    dist_utils.barrier(ctx)

    train_model = dist_utils.wrap(model, ctx)
    if cfg.compile:
        train_model = torch.compile(train_model)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if cfg.bf16 and device.type == "cuda"
                else contextlib.nullcontext())
    local = slice(ctx.rank * cfg.batch_size // ctx.world_size,
                  (ctx.rank + 1) * cfg.batch_size // ctx.world_size)

    def log(record: dict[str, Any]) -> None:
        if is_main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def evaluate(step: int) -> dict[str, Any]:
        nonlocal steps_to_target
        model.eval()
        eval_gen = torch.Generator().manual_seed(cfg.seed + 2)
        sums: dict[str, float] = {}
        with torch.no_grad(), autocast:
            batches = (eval_task.eval_batches(cfg.batch_size, cfg.eval_batches)
                       if hasattr(eval_task, "eval_batches") else
                       (eval_task.sample(cfg.batch_size, eval_gen)
                        for _ in range(cfg.eval_batches)))
            for batch in batches:
                batch = batch.to(device)
                m = eval_task.metrics(model(batch.tokens).float(), batch)
                for k, v in m.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
        model.train()
        record = {"step": step, "kind": "eval",
                  **{f"eval/{k}": v / cfg.eval_batches for k, v in sums.items()},
                  "coefficients": coefficient_log(model)}
        acc = record.get("eval/accuracy")
        if steps_to_target is None and acc is not None and acc >= cfg.target_accuracy:
            steps_to_target = step
        record["steps_to_target"] = steps_to_target
        evals.append(record)
        log(record)
        return record

    def checkpoint(step: int) -> None:
        if is_main:
            save_checkpoint(run_dir, step, model, optimizer, scheduler, generators,
                            {"evals": evals, "steps_to_target": steps_to_target},
                            keep=cfg.keep_checkpoints)
        dist_utils.barrier(ctx)

    if start_step == 0:
        evaluate(0)
    bar = None
    if cfg.progress and is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=start_step, desc=run_dir.name, file=sys.stderr,
                   dynamic_ncols=True, leave=False)
    tokens_seen, t0 = 0, time.perf_counter()
    step = start_step
    try:
        while step < cfg.steps:
            batch = task.sample(cfg.batch_size, data_gen).to(device)
            targets = batch.targets
            n_global = int((targets != IGNORE_INDEX).sum())
            tokens = batch.tokens[local]
            with autocast:
                logits = train_model(tokens)
            loss_sum = F.cross_entropy(logits.float().flatten(0, 1), targets[local].flatten(),
                                       ignore_index=IGNORE_INDEX, reduction="sum")
            # DDP averages gradients over processes; scale so the result is the global mean.
            loss = loss_sum * (ctx.world_size / max(1, n_global))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(
                model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
            global_loss = dist_utils.all_reduce_sum(loss_sum.detach(), ctx) / max(1, n_global)
            if not (torch.isfinite(global_loss) and torch.isfinite(grad_norm)):
                raise TrainingDiverged(
                    f"step {step + 1}: loss={float(global_loss)}, grad_norm={float(grad_norm)} "
                    "is not finite; stopped. The last good checkpoint is kept"
                    + (f" in {run_dir / 'checkpoints'}" if (run_dir / "checkpoints").exists()
                       else " (none was written yet)")
                    + "; try a lower lr or stronger grad_clip")
            optimizer.step()
            scheduler.step()
            model.constrain_shift_()
            step += 1
            tokens_seen += batch.tokens.numel()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{float(global_loss):.4f}")
            if step % cfg.log_every == 0 or step == cfg.steps:
                log({"step": step, "kind": "train", "train/loss": float(global_loss),
                     "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm)})
            if step % cfg.eval_every == 0 or step == cfg.steps:
                evaluate(step)
                if cfg.stop_at_target and steps_to_target is not None:
                    checkpoint(step)
                    break
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                checkpoint(step)
    finally:
        if bar is not None:
            bar.close()
    elapsed = time.perf_counter() - t0
    if evals[-1]["step"] != step:
        evaluate(step)
    log({"step": step, "kind": "summary", "tokens_per_second": tokens_seen / max(elapsed, 1e-9),
         "elapsed_s": elapsed, "steps_to_target": steps_to_target})
    if is_main:
        if not cfg.checkpoint_every or step % cfg.checkpoint_every:
            save_checkpoint(run_dir, step, model, optimizer, scheduler, generators,
                            {"evals": evals, "steps_to_target": steps_to_target},
                            keep=cfg.keep_checkpoints)
        model.save_pretrained(run_dir / "final")
    dist_utils.barrier(ctx)
    final = {k[len("eval/"):]: v for k, v in evals[-1].items() if k.startswith("eval/")}
    return TrainResult(run_dir=run_dir, steps=step, final_metrics=final,
                       steps_to_target=steps_to_target,
                       tokens_per_second=tokens_seen / elapsed if elapsed > 0 else float("nan"),
                       evals=evals, model=model)


__all__ = ["CheckpointError", "RunFolderError", "TrainResult", "TrainingDiverged", "train"]
