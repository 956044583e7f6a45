"""One trainer for synthetic tasks and text: AdamW, warm-up + cosine, clipping, evaluation with the
task's metrics and the shift coefficients, JSONL metrics, atomic resumable checkpoints, a NaN guard,
and data parallelism through ``torchrun``.

The run folder it writes, the lock it holds and what it never deletes are described in
:mod:`kvshift_lens.run_folder`.

Determinism: every random draw comes from explicit generators (model init, data, evaluation) whose
states are checkpointed, so ``resume`` continues bit-identically on CPU, however often a run is
killed. Under DDP every process draws the same global batch and trains on its slice; the loss is
normalised by the global number of predicted tokens, so gradients and logged losses equal a single
process's on the same global batch.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kvshift_lens.checkpoint import CheckpointError, first_nonfinite
from kvshift_lens.config import KVShiftConfig
from kvshift_lens.data.tasks import IGNORE_INDEX, masked_cross_entropy
from kvshift_lens.model import HookedKVShiftTransformer
from kvshift_lens.run_folder import (
    CHECKPOINTS_DIR,
    FINAL_DIR,
    METRICS_FILE,
    RUN_FILE,
    RunFolderError,
    RunWriter,
    append_metric,
    latest_checkpoint,
    truncate_metrics,
)
from kvshift_lens.train import distributed as dist_utils
from kvshift_lens.train.config import (
    EXECUTION_ONLY,
    ResolvedRun,
    RunSpec,
    TrainConfig,
    resolve_run_spec,
)
from kvshift_lens.train.evaluation import evaluate, nonfinite_metrics
from kvshift_lens.train.state import (
    load_checkpoint_state,
    optimizer_tensors,
    restore_generators,
    restore_optimizer,
    save_checkpoint,
)

logger = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss, a gradient, a parameter or an evaluation became NaN/inf; training stopped and the
    last good checkpoint (never a non-finite one) is kept."""


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


def param_groups(model: HookedKVShiftTransformer, cfg: TrainConfig) -> list[dict[str, Any]]:
    """Weight matrices (decayed), other parameters, and shift coefficients (no decay, their own
    learning-rate scale); only parameters that require gradients."""
    shift_ids = {id(p) for p in model.shift_parameters()}
    decay, no_decay, shift = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in shift_ids:
            shift.append(p)
        else:
            (decay if name.rsplit(".", 1)[-1].lstrip("_").startswith("W_") else no_decay).append(p)
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


# ---------------------------------------------------------------------------------------------
# Opening the run folder
# ---------------------------------------------------------------------------------------------


def _normalised(spec: dict[str, Any]) -> dict[str, Any]:
    """A run.json (this version's or an older, shorter one) with every default filled in and the
    resumable settings dropped, for comparing a resume's spec with the folder's."""
    model = KVShiftConfig.from_dict({**spec.get("model", {}), "device": "cpu"}).to_dict()
    train = {k: v for k, v in TrainConfig.from_dict(spec.get("train", {})).to_dict().items()
             if k not in EXECUTION_ONLY}
    return {"model": model, "task": dict(spec.get("task", {})), "train": train}


def check_resume(run_dir: Path, run: ResolvedRun) -> None:
    """Raise :class:`RunFolderError` unless ``run`` continues the run in ``run_dir``."""
    path = run_dir / RUN_FILE
    try:
        saved = _normalised(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, TypeError, ValueError) as e:
        raise RunFolderError(f"cannot resume: {path} is unreadable ({e})") from None
    new = run.comparable()
    if saved != new:
        diff = sorted(k for k in new if saved.get(k) != new.get(k))
        fields = sorted(f"{k}.{f}" for k in diff if isinstance(new[k], dict)
                        for f in set(new[k]) | set(saved.get(k, {}))
                        if new[k].get(f) != saved.get(k, {}).get(f))
        raise RunFolderError(
            f"cannot resume {run_dir}: its run.json differs from this run in {diff} "
            f"({', '.join(fields[:6])}); resume with the same settings or use a new folder")


def _mode(resume: bool, overwrite: bool) -> str:
    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other")
    return "resume" if resume else "overwrite" if overwrite else "new"


# ---------------------------------------------------------------------------------------------
# The training loop
# ---------------------------------------------------------------------------------------------


class Trainer:
    """A training run in short steps: :meth:`restore` (resume), :meth:`evaluate`, :meth:`step`,
    :meth:`checkpoint`, :meth:`finish`. :func:`train` drives it."""

    def __init__(self, run: ResolvedRun, run_dir: Path, writer: RunWriter | None,
                 ctx: dist_utils.DistContext, model: HookedKVShiftTransformer | None):
        cfg = self.cfg = run.train
        self.run, self.run_dir, self.writer, self.ctx = run, run_dir, writer, ctx
        self.is_main = ctx.rank == 0
        self.device = ctx.device if ctx.world_size > 1 else resolve_device(cfg.device)
        if model is None:
            # A text task's tokenizer goes with the model, so checkpoints and final/ carry it.
            model = HookedKVShiftTransformer(
                run.model, generator=torch.Generator().manual_seed(cfg.seed),
                tokenizer=getattr(run.task, "tokenizer", None))
        self.model = model.to(self.device).train()
        self.optimizer = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, betas=cfg.betas,
                                           fused=self.device.type == "cuda" or None)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_lambda(s, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio))
        self.data_gen = torch.Generator().manual_seed(cfg.seed + 1)
        self.generators = {"data": self.data_gen}
        self.step_no, self.evals, self.steps_to_target = 0, [], None
        self.saved_step: int | None = None
        self.tokens_seen = 0
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16)
                         if cfg.bf16 and self.device.type == "cuda" else contextlib.nullcontext())
        n, r = ctx.world_size, ctx.rank
        self.local = slice(r * cfg.batch_size // n, (r + 1) * cfg.batch_size // n)
        self.train_model = dist_utils.wrap(self.model, ctx)
        if cfg.compile:
            self.train_model = torch.compile(self.train_model)

    # -- files ----------------------------------------------------------------------------
    @property
    def folder(self) -> Path:
        return self.writer.path if self.writer is not None else self.run_dir

    def log(self, record: dict[str, Any]) -> None:
        if self.is_main:
            append_metric(self.folder / METRICS_FILE, record)

    # -- resuming -------------------------------------------------------------------------
    def restore(self, run_dir: Path) -> None:
        """Continue from the run's latest checkpoint (every process reads it); with none, start
        over, dropping whatever a run killed before its first checkpoint logged."""
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            logger.info("no checkpoint in %s: starting from step 0", run_dir)
            if self.is_main:
                truncate_metrics(run_dir / METRICS_FILE, -1)
            return
        loaded = HookedKVShiftTransformer.from_pretrained(ckpt, device=str(self.device))
        if loaded.cfg.to_dict() != self.run.model.to_dict():
            raise RunFolderError(f"cannot resume: the model config in {ckpt} differs from "
                                 f"{run_dir / RUN_FILE}")
        self.model.load_state_dict(loaded.state_dict())
        tensors, meta = load_checkpoint_state(ckpt)
        restore_optimizer(self.optimizer, tensors, meta, ckpt)
        try:
            self.scheduler.load_state_dict(meta["scheduler"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"checkpoint {ckpt}: its scheduler state is invalid ({e})") \
                from None
        restore_generators(self.generators, tensors, ckpt)
        self.step_no = self.saved_step = meta["step"]
        self.evals = meta.get("evals", []) if isinstance(meta.get("evals"), list) else []
        self.steps_to_target = meta.get("steps_to_target")
        if self.is_main:
            truncate_metrics(run_dir / METRICS_FILE, self.step_no)

    # -- one evaluation, one step ---------------------------------------------------------
    def evaluate(self) -> dict[str, Any]:
        cfg, step = self.cfg, self.step_no
        metrics = evaluate(self.model, self.run.eval_task, cfg.batch_size, cfg.eval_batches,
                           seed=cfg.seed + 2, device=self.device, autocast=self.autocast)
        bad = nonfinite_metrics(metrics)
        if bad:
            raise TrainingDiverged(self._diverged(f"the {bad[0]} is {metrics[bad[0]]}",
                                                  in_step=False))
        record = {"step": step, "kind": "eval", **{f"eval/{k}": v for k, v in metrics.items()},
                  "coefficients": coefficient_log(self.model)}
        acc = record.get("eval/accuracy")
        if self.steps_to_target is None and acc is not None and acc >= cfg.target_accuracy:
            self.steps_to_target = step
        record["steps_to_target"] = self.steps_to_target
        self.evals.append(record)
        self.log(record)
        return record

    def step(self) -> float:
        """One optimiser step on one global batch; returns the global mean loss."""
        cfg, ctx = self.cfg, self.ctx
        batch = self.run.task.sample(cfg.batch_size, self.data_gen).to(self.device)
        targets = batch.targets
        n_global = max(1, int((targets != IGNORE_INDEX).sum()))
        with self.autocast:
            logits = self.train_model(batch.tokens[self.local])
        loss_sum = masked_cross_entropy(logits, targets[self.local], reduction="sum")
        # DDP averages gradients over processes; scale so the result is the global mean.
        self.optimizer.zero_grad(set_to_none=True)
        (loss_sum * (ctx.world_size / n_global)).backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        loss = dist_utils.all_reduce_sum(loss_sum.detach(), ctx) / n_global
        self._check_step(float(loss), float(grad_norm))
        self.optimizer.step()
        self.scheduler.step()
        self.model.constrain_shift_()
        self.step_no += 1
        self.tokens_seen += batch.tokens.numel()
        if self.step_no % cfg.log_every == 0 or self.step_no == cfg.steps:
            self.log({"step": self.step_no, "kind": "train", "train/loss": float(loss),
                      "lr": self.scheduler.get_last_lr()[0], "grad_norm": float(grad_norm)})
        return float(loss)

    # -- the NaN guard --------------------------------------------------------------------
    def _kept(self) -> str:
        ckpt = latest_checkpoint(self.folder) if self.is_main else None
        kept = (f"The last good checkpoint is kept in {ckpt}" if ckpt is not None
                else "No checkpoint had been written yet")
        return f"{kept}; try a lower lr or a stronger grad_clip"

    def _diverged(self, what: str, in_step: bool = True) -> str:
        """The NaN guard's message: where (the step about to be taken, or the evaluation after
        the last one), the first non-finite quantity, and what was kept."""
        where = (f"step {self.step_no + 1}: {what}, not finite; stopped before the update" if in_step
                 else f"evaluation at step {self.step_no}: {what}, not finite; stopped")
        return f"{where}. {self._kept()}"

    def _check_step(self, loss: float, grad_norm: float) -> None:
        if not math.isfinite(loss):
            raise TrainingDiverged(self._diverged(f"the training loss is {loss}"))
        if not math.isfinite(grad_norm):
            grads = {n: p.grad for n, p in self.model.named_parameters() if p.grad is not None}
            first = first_nonfinite(grads)
            where = f"the gradient of {first[0]}" if first else "the gradient norm"
            raise TrainingDiverged(self._diverged(f"{where} is not finite (norm {grad_norm})"))

    def _check_state(self) -> None:
        """Never checkpoint a non-finite model or optimiser state."""
        bad = first_nonfinite(dict(self.model.named_parameters())) or first_nonfinite(
            optimizer_tensors(self.optimizer))
        if bad is not None:
            what = f"{bad[0]} holds {bad[1]} non-finite value(s) after step {self.step_no}"
            raise TrainingDiverged(f"{what}; no checkpoint was written for it. {self._kept()}")

    # -- checkpoints ----------------------------------------------------------------------
    def checkpoint(self) -> None:
        """A resumable checkpoint of the current step (once per step)."""
        if self.saved_step == self.step_no:
            return
        self._check_state()
        if self.is_main:
            save_checkpoint(self.folder, self.step_no, self.model, self.optimizer, self.scheduler,
                            self.generators, {"evals": self.evals,
                                              "steps_to_target": self.steps_to_target},
                            keep=self.cfg.keep_checkpoints)
        self.saved_step = self.step_no
        dist_utils.barrier(self.ctx)

    def finish(self, elapsed: float) -> TrainResult:
        if self.evals[-1]["step"] != self.step_no:
            self.evaluate()
        tps = self.tokens_seen / elapsed if elapsed > 0 else float("nan")
        self.log({"step": self.step_no, "kind": "summary", "tokens_per_second": tps,
                  "elapsed_s": elapsed, "steps_to_target": self.steps_to_target})
        self.checkpoint()
        if self.is_main:
            self.model.save_pretrained(self.folder / FINAL_DIR)
        dist_utils.barrier(self.ctx)
        final = {k[len("eval/"):]: v for k, v in self.evals[-1].items() if k.startswith("eval/")}
        return TrainResult(run_dir=self.run_dir,
                           steps=self.step_no, final_metrics=final,
                           steps_to_target=self.steps_to_target, tokens_per_second=tps,
                           evals=self.evals, model=self.model)

    def loop(self, on_started) -> TrainResult:
        """Evaluate at step 0 (a fresh run), call ``on_started``, then train to the end."""
        cfg = self.cfg
        if self.step_no == 0:
            self.evaluate()
        on_started()
        bar = _progress_bar(cfg, self.step_no, self.folder.name) if self.is_main else None
        t0 = time.perf_counter()
        try:
            while self.step_no < cfg.steps:
                loss = self.step()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}")
                if self.step_no % cfg.eval_every == 0 or self.step_no == cfg.steps:
                    self.evaluate()
                    if cfg.stop_at_target and self.steps_to_target is not None:
                        break
                if cfg.checkpoint_every and self.step_no % cfg.checkpoint_every == 0:
                    self.checkpoint()
        finally:
            if bar is not None:
                bar.close()
        return self.finish(time.perf_counter() - t0)


def _progress_bar(cfg: TrainConfig, initial: int, name: str):
    """A progress bar on a terminal (or in a notebook); none when stderr goes to a file."""
    if not cfg.progress:
        return None
    from tqdm.auto import tqdm

    interactive = sys.stderr.isatty() or "ipykernel" in sys.modules
    return tqdm(total=cfg.steps, initial=initial, desc=name, file=sys.stderr,
                dynamic_ncols=True, leave=False, disable=not interactive)


# ---------------------------------------------------------------------------------------------
# The entry point
# ---------------------------------------------------------------------------------------------


def train(
    spec: RunSpec | ResolvedRun | dict[str, Any],
    run_dir: str | Path,
    resume: bool = False,
    overwrite: bool = False,
    model: HookedKVShiftTransformer | None = None,
) -> TrainResult:
    """Train the model described by ``spec`` (or the given ``model``) and write the run folder.

    Args:
        spec: model config, task and training settings (resolved here when not yet resolved).
        run_dir: the run folder (see :mod:`kvshift_lens.run_folder`).
        resume: continue from the latest checkpoint in ``run_dir``.
        overwrite: replace the run in ``run_dir`` (only a kvshift run, and only once the new run
            has started).
        model: an already-built model to train (e.g. a retrofitted one); its config fills what
            ``spec.model`` leaves out and must agree with what it sets.

    Raises:
        RunFolderError: the folder exists without resume/overwrite, holds foreign files, is
            written by another process, or its settings differ from a resume's.
        CheckpointError: a damaged checkpoint on resume.
        TrainingDiverged: the loss, gradients, weights or evaluation became non-finite.
        ValueError, TypeError: a bad spec (before anything is written).
    """
    run = spec if isinstance(spec, ResolvedRun) else resolve_run_spec(
        spec, model_config=None if model is None else model.cfg)
    if model is not None and model.cfg.to_dict() != run.model.to_dict():
        diff = sorted(k for k, v in run.model.to_dict().items() if model.cfg.to_dict().get(k) != v)
        raise ValueError(f"the model's config differs from the run's model config in {diff}")
    if not torch.is_grad_enabled():
        logger.info("gradients were disabled (torch.set_grad_enabled(False)); training enables "
                    "them for its own steps")
    cfg, mode = run.train, _mode(resume, overwrite)
    run_dir = Path(run_dir)
    ctx = dist_utils.init_from_env(cfg.device)
    if cfg.batch_size % ctx.world_size:
        raise ValueError(f"batch_size={cfg.batch_size} must be divisible by the number of "
                         f"processes ({ctx.world_size})")
    writer = RunWriter(run_dir, mode) if ctx.rank == 0 else None
    with contextlib.ExitStack() as stack, torch.enable_grad():
        error = None
        if writer is not None:
            try:
                stack.enter_context(writer)
                if mode == "resume":
                    check_resume(run_dir, run)
                else:
                    (writer.path / RUN_FILE).write_text(json.dumps(run.to_dict(), indent=2))
            except (RunFolderError, CheckpointError, OSError) as e:
                error = e
        if not dist_utils.all_ok(error is None, ctx):
            raise error if error is not None else RunFolderError(
                f"{run_dir}: the main process could not open the run folder")
        trainer = Trainer(run, run_dir, writer, ctx, model)
        if mode == "resume":
            trainer.restore(run_dir)
        dist_utils.barrier(ctx)
        return trainer.loop(on_started=writer.commit_start if writer else lambda: None)


__all__ = ["CHECKPOINTS_DIR", "CheckpointError", "RunFolderError", "TrainResult",
           "TrainingDiverged", "Trainer", "param_groups", "train"]
