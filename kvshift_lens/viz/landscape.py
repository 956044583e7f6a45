"""The loss landscape over (alpha1, beta1), computed from a real model (PAPER.md item 5, the
paper's Fig. 2).

For the chosen key/value heads of one layer the coefficient hooks
(``blocks.{layer}.attn.hook_shift_k`` / ``hook_shift_v``, shape ``[kv_head, lag]``) replace the
model's coefficients, for one forward pass, with::

    (alpha1, alpha2) = (a, 1 - a)        (beta1, beta2) = (b, 1 - b)

and every other head keeps its own. The loss is the masked next-token cross-entropy on an induction
batch (only the positions the task's rule predicts). ``a`` and ``b`` are 0-d leaf tensors that
require grad, so autograd through the hook gives the gradient ``(d loss / d a, d loss / d b)`` of
the loss restricted to that plane at every grid point. No weight is changed.

Each grid point is one forward (and backward) pass over the whole batch: the hooks set one set of
coefficients per pass, and replicating the batch across grid points measured no faster on CPU (the
work is the same, the model is compute-bound), so only the data are batched.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from kvshift_lens.data.tasks import Batch, masked_cross_entropy

logger = logging.getLogger(__name__)


@dataclass
class Landscape:
    """The loss over a grid of (alpha1, beta1) for some heads of one layer.

    Attributes:
        a1: ``[n_a]`` alpha1 values (alpha2 = 1 - alpha1).
        b1: ``[n_b]`` beta1 values (beta2 = 1 - beta1).
        loss: ``[n_a, n_b]``; ``loss[i, j]`` is the loss at ``(a1[i], b1[j])``.
        grad: ``[n_a, n_b, 2]`` gradient (d loss / d alpha1, d loss / d beta1) along the plane,
            or None when not computed.
        layer: the layer whose coefficients were set.
        heads: the key/value heads that were moved together (the others keep their own).
        positions: ``{"L0H1": (alpha1, beta1)}``: the model's own coefficients of the moved heads
            (their alpha2 and beta2 need not be 1 - alpha1 and 1 - beta1).
        model_loss: the loss of the unhooked model on the same batch.
        n_sequences: sequences in the batch.
    """

    a1: Float[Tensor, " n_a"]
    b1: Float[Tensor, " n_b"]
    loss: Float[Tensor, "n_a n_b"]
    grad: Float[Tensor, "n_a n_b 2"] | None
    layer: int
    heads: list[int]
    positions: dict[str, tuple[float, float]]
    model_loss: float
    n_sequences: int

    def argmin(self) -> tuple[float, float]:
        """(alpha1, beta1) of the lowest loss on the grid."""
        i = int(self.loss.argmin())
        n_b = self.loss.shape[1]
        return float(self.a1[i // n_b]), float(self.b1[i % n_b])


def _check_model(model, layer: int) -> None:
    cfg = model.cfg
    if not (cfg.shift_k and cfg.shift_v):
        raise ValueError(
            f"the (alpha1, beta1) landscape needs keys and values shifted; this model has "
            f"shift_k={cfg.shift_k}, shift_v={cfg.shift_v}")
    if cfg.shift_window != 1:
        raise ValueError(f"the (alpha1, beta1) landscape is defined for shift_window=1 (alpha2 = "
                         f"1 - alpha1); this model has shift_window={cfg.shift_window}")
    if not 0 <= layer < cfg.n_layers:
        raise ValueError(f"layer={layer} is out of range: the model has n_layers={cfg.n_layers}")


def _resolve_heads(model, heads: int | Sequence[int] | None) -> list[int]:
    n = model.cfg.n_key_value_heads
    chosen = list(range(n)) if heads is None else ([heads] if isinstance(heads, int) else
                                                   [int(h) for h in heads])
    bad = [h for h in chosen if not 0 <= h < n]
    if bad or not chosen:
        raise ValueError(f"heads={heads!r}: key/value heads must be in [0, {n}) (the model has "
                         f"n_key_value_heads={n}) and at least one must be given")
    return sorted(set(chosen))


def plane_hooks(
    model,
    layer: int,
    heads: int | Sequence[int] | None,
    a1: Tensor | float,
    b1: Tensor | float,
) -> list[tuple[str, Callable]]:
    """Forward hooks putting the given key/value heads of ``layer`` at (alpha1, beta1) =
    ``(a1, b1)`` with alpha2 = 1 - a1, beta2 = 1 - b1; other heads keep their coefficients.

    ``a1`` and ``b1`` may be 0-d tensors requiring grad: the hooks build the coefficients from
    them, so the loss is differentiable in them. Use with ``model.run_with_hooks`` or
    ``model.hooks``.
    """
    _check_model(model, layer)
    chosen = _resolve_heads(model, heads)
    point = {"a": torch.as_tensor(a1), "b": torch.as_tensor(b1)}
    attn = f"blocks.{layer}.attn"
    return [(f"{attn}.hook_shift_k", _setter(point, "a", chosen)),
            (f"{attn}.hook_shift_v", _setter(point, "b", chosen))]


def _batch_of(batch_or_task, n_sequences: int, seed: int) -> Batch:
    if isinstance(batch_or_task, Batch):
        return batch_or_task
    if hasattr(batch_or_task, "sample"):
        return batch_or_task.sample(n_sequences, torch.Generator().manual_seed(seed))
    raise TypeError("batch_or_task must be a Batch or a task with .sample(batch_size, generator), "
                    f"got {type(batch_or_task).__name__}")


def _axis(span: tuple[float, float], n: int, name: str) -> Tensor:
    lo, hi = (float(x) for x in span)
    if not lo < hi:
        raise ValueError(f"{name}={span!r} must be (low, high) with low < high")
    return torch.linspace(lo, hi, n, dtype=torch.float64)


def loss_landscape(
    model,
    batch_or_task,
    layer: int = 0,
    heads: int | Sequence[int] | None = None,
    grid: int | tuple[int, int] = 21,
    a_range: tuple[float, float] = (-0.5, 1.5),
    b_range: tuple[float, float] = (-0.5, 1.5),
    n_sequences: int = 32,
    seed: int = 0,
    gradient: bool = True,
) -> Landscape:
    """The induction loss over a grid of (alpha1, beta1), with its gradient field.

    Args:
        model: a :class:`~kvshift_lens.HookedKVShiftTransformer` with keys and values shifted,
            window 1.
        batch_or_task: a :class:`~kvshift_lens.data.tasks.Batch`, or a task (e.g.
            ``InductionTask``) to draw ``n_sequences`` from with a generator seeded ``seed``.
        layer: the layer whose coefficients are set.
        heads: one key/value head, several (moved together), or None for every head of the layer.
        grid: points per axis (or ``(n_a, n_b)``), at least 2.
        a_range, b_range: the alpha1 and beta1 spans (endpoints included).
        gradient: also compute the gradient at every grid point (about 3x the time).

    Returns:
        A :class:`Landscape`.
    """
    _check_model(model, layer)
    chosen = _resolve_heads(model, heads)
    n_a, n_b = (grid, grid) if isinstance(grid, int) else grid
    if n_a < 2 or n_b < 2:
        raise ValueError(f"grid={grid!r} must have at least 2 points per axis")
    a1s, b1s = _axis(a_range, n_a, "a_range"), _axis(b_range, n_b, "b_range")
    device = torch.device(model.cfg.device)
    batch = _batch_of(batch_or_task, n_sequences, seed).to(device)
    if batch.n_predictions == 0:
        raise ValueError("the batch has no masked positions, so there is no loss to map")

    point: dict[str, Tensor] = {}  # the current grid point, read by the hooks
    loss = torch.empty(n_a, n_b, dtype=torch.float64)
    grad = torch.empty(n_a, n_b, 2, dtype=torch.float64) if gradient else None
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model_loss = float(masked_cross_entropy(model(batch.tokens), batch))
        hooks = [(f"blocks.{layer}.attn.hook_shift_k", _setter(point, "a", chosen)),
                 (f"blocks.{layer}.attn.hook_shift_v", _setter(point, "b", chosen))]
        with model.hooks(fwd_hooks=hooks), torch.set_grad_enabled(gradient):
            for i, a in enumerate(a1s.tolist()):
                for j, b in enumerate(b1s.tolist()):
                    point["a"] = torch.tensor(a, dtype=torch.float64, requires_grad=gradient)
                    point["b"] = torch.tensor(b, dtype=torch.float64, requires_grad=gradient)
                    here = masked_cross_entropy(model(batch.tokens), batch)
                    loss[i, j] = float(here.detach())
                    if grad is not None:
                        ga, gb = torch.autograd.grad(here, (point["a"], point["b"]))
                        grad[i, j, 0], grad[i, j, 1] = float(ga), float(gb)
    finally:
        model.train(was_training)
    own = model.shift_coefficients()
    positions = {f"L{layer}H{h}": (float(own["k"][layer, h, 0]), float(own["v"][layer, h, 0]))
                 for h in chosen}
    logger.debug("landscape layer %d heads %s: %d x %d points, loss %.4f..%.4f", layer, chosen,
                 n_a, n_b, float(loss.min()), float(loss.max()))
    return Landscape(a1=a1s, b1=b1s, loss=loss, grad=grad, layer=layer, heads=chosen,
                     positions=positions, model_loss=model_loss,
                     n_sequences=int(batch.tokens.shape[0]))


def _set(coeffs: Float[Tensor, "kv_head lag"], value: Tensor,
         heads: list[int]) -> Float[Tensor, "kv_head lag"]:
    """``coeffs`` with the rows of ``heads`` replaced by ``(value, 1 - value)``, out of place so
    that gradients flow to ``value``."""
    sel = torch.zeros(coeffs.shape[0], 1, dtype=torch.bool, device=coeffs.device)
    sel[heads] = True
    value = value.to(coeffs.device)
    row = torch.stack([value, 1 - value]).to(coeffs.dtype)  # [lag]
    return torch.where(sel, row, coeffs)


def _setter(point: dict[str, Tensor], name: str, heads: list[int]) -> Callable:
    def hook(coeffs: Float[Tensor, "kv_head lag"], hook) -> Float[Tensor, "kv_head lag"]:
        return _set(coeffs, point[name], heads)

    return hook


__all__ = ["Landscape", "loss_landscape", "plane_hooks"]
