"""One evaluation: a task's metrics averaged over fixed evaluation batches (the trainer's every
evaluation, ``kvshift eval``, and anything else that wants the same numbers)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch


def eval_batches(task: Any, batch_size: int, n_batches: int, seed: int) -> Iterator[Any]:
    """The evaluation batches of ``task``: its own ``eval_batches`` when it has them (text: fixed
    validation windows), else ``n_batches`` draws from a generator seeded with ``seed``."""
    if hasattr(task, "eval_batches"):
        yield from task.eval_batches(batch_size, n_batches)
        return
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n_batches):
        yield task.sample(batch_size, gen)


@torch.no_grad()
def evaluate(
    model: Any,
    task: Any,
    batch_size: int,
    n_batches: int,
    seed: int,
    device: torch.device | str = "cpu",
    autocast: Any = None,
) -> dict[str, float]:
    """Mean of ``task.metrics(logits, batch)`` over :func:`eval_batches`, with the model in eval
    mode (restored afterwards).

    Args:
        model: the model (called on ``batch.tokens``).
        task: anything with ``metrics`` and ``sample`` (or ``eval_batches``).
        batch_size, n_batches: the evaluation data's size.
        seed: the evaluation generator's seed (the trainer uses ``train.seed + 2``).
        device: where batches go.
        autocast: a context manager for the forward passes (bf16 autocast on CUDA), or None.

    Returns:
        Each metric's mean over the batches evaluated.

    Raises:
        ValueError: the task yielded no batch.
    """
    was_training = model.training
    model.eval()
    sums: dict[str, float] = {}
    n = 0
    try:
        for batch in eval_batches(task, batch_size, n_batches, seed):
            batch = batch.to(device)
            with autocast if autocast is not None else contextlib.nullcontext():
                logits = model(batch.tokens)
            for k, v in task.metrics(logits.float(), batch).items():
                sums[k] = sums.get(k, 0.0) + float(v)
            n += 1
    finally:
        model.train(was_training)
    if n == 0:
        raise ValueError("the task produced no evaluation batch")
    return {k: v / n for k, v in sums.items()}


def nonfinite_metrics(metrics: dict[str, float]) -> list[str]:
    """The names of metrics that are NaN or infinite."""
    return [k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)]
