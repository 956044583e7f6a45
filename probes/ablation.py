"""Ablations through hooks (never weight edits) and their effect on a task's masked metrics.

Every ablation is an :class:`Ablation`: a full hook name and a forward-hook function that returns a
modified *copy* of the activation, so running the model with it leaves every parameter untouched
and the next plain forward pass is the unablated model again.

- :func:`zero_ablate_head` / :func:`mean_ablate_head`: replace one head's ``hook_z``
  ``[batch, pos, head, d_head]`` slice by zeros, or by its mean over batch and positions on a
  reference batch (the head's output is then ``mean_z @ W_O`` at every position: the head still
  writes its average, but nothing that depends on the input).
- :func:`remove_shift` (:func:`remove_key_shift`, :func:`remove_value_shift`): set one KV head's
  coefficients, through the coefficient hook ``blocks.{l}.attn.hook_shift_{k|v}`` ``[kv_head,
  lag]``, to the identity ``(1, 0, ..., 0)``: ``K' = K`` (or ``V' = V``), the head unshifted and
  every other weight as trained.
- :func:`ablation_effect`: loss and accuracy on the task's masked positions before and after a set
  of ablations; :func:`ablate_each_head` / :func:`ablate_each_shift`: one ablation at a time over
  every head, as ``[layer, head]`` tables.

Models are read through the TransformerLens protocol (``cfg``, ``hook_dict``, ``run_with_hooks``,
``run_with_cache``); nothing here imports ``kvshift_lens``. Tasks are duck-typed: anything with
``sample(batch_size, generator)`` and ``metrics(logits, batch)`` (``kvshift_lens.data.tasks``), or a
batch with ``tokens`` and ``mask`` (``mask[b, t]``: ``tokens[b, t + 1]`` is predictable).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from probes._hooks import model_device, model_dims, prepare_tokens, require_hooks

if TYPE_CHECKING:  # pragma: no cover
    from kvshift_lens.data.tasks import Batch, SyntheticTask

HookFn = Callable[[Tensor, Any], Tensor]


def z_hook(layer: int) -> str:
    """Layer ``layer``'s per-head attention output before ``W_O``: ``[batch, pos, head, d_head]``."""
    return f"blocks.{layer}.attn.hook_z"


def shift_hook(layer: int, which: str) -> str:
    """Layer ``layer``'s coefficient hook for projection ``which`` ("k", "v" or "q"):
    ``[kv_head, lag]`` (query heads for "q")."""
    if which not in ("q", "k", "v"):
        raise ValueError(f"which={which!r} must be 'q', 'k' or 'v'")
    return f"blocks.{layer}.attn.hook_shift_{which}"


@dataclass(frozen=True)
class Ablation:
    """One intervention: ``fn`` runs as a forward hook on ``hook_name`` and returns the modified
    activation (a new tensor; the hook's input is never written to)."""

    hook_name: str
    fn: HookFn = field(repr=False)
    label: str

    @property
    def fwd_hook(self) -> tuple[str, HookFn]:
        """``(hook_name, fn)``, the form ``run_with_hooks(fwd_hooks=[...])`` takes."""
        return (self.hook_name, self.fn)


def _check_index(name: str, value: int, n: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < n:
        raise ValueError(f"{name}={value!r} is out of range: expected an int in [0, {n})")
    return value


def _dims(model: Any, hook_name: str) -> tuple[int, int]:
    """``(n_layers, n_heads)``; a ValueError naming ``hook_name`` for a model without a TL config."""
    try:
        return model_dims(model)
    except ValueError:
        raise ValueError(
            f"{type(model).__name__} is not a TransformerLens-style model (no cfg with n_layers and "
            f"n_heads), so it has no hook {hook_name!r} for this probe") from None


def _n_kv_heads(model: Any) -> int:
    _, n_heads = model_dims(model)
    n_kv = getattr(model.cfg, "n_key_value_heads", None)
    return n_heads if n_kv is None else int(n_kv)


def _replace_head(layer: int, head: int, value: Tensor | None, label: str) -> Ablation:
    name = z_hook(layer)

    def fn(z: Tensor, hook: Any) -> Tensor:
        out = z.clone()
        out[:, :, head] = 0 if value is None else value.to(device=z.device, dtype=z.dtype)
        return out

    return Ablation(name, fn, label)


def zero_ablate_head(model: Any, layer: int, head: int) -> Ablation:
    """Zero head ``head`` of layer ``layer`` at ``hook_z`` (its output becomes 0 at every
    position; the layer's ``b_O`` is still added)."""
    n_layers, n_heads = _dims(model, z_hook(layer))
    _check_index("layer", layer, n_layers)
    _check_index("head", head, n_heads)
    require_hooks(model, [z_hook(layer)])
    return _replace_head(layer, head, None, f"zero L{layer}H{head}")


@torch.no_grad()
def head_means(model: Any, reference: Tensor | Batch) -> list[Float[Tensor, "head d_head"]]:
    """Every layer's ``hook_z`` averaged over the batch and positions of ``reference`` (token ids
    ``[batch, pos]`` or a batch with ``tokens``): one ``[head, d_head]`` tensor per layer."""
    n_layers, _ = _dims(model, z_hook(0))
    names = [z_hook(layer) for layer in range(n_layers)]
    require_hooks(model, names)
    tokens = prepare_tokens(model, getattr(reference, "tokens", reference))
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    return [cache[name].mean(dim=(0, 1)) for name in names]


def mean_ablate_head(
    model: Any, layer: int, head: int, reference: Tensor | Batch | None = None,
    means: Sequence[Tensor] | None = None,
) -> Ablation:
    """Replace head ``head`` of layer ``layer`` at ``hook_z`` by its mean over every batch
    element and position of ``reference`` (token ids ``[batch, pos]``, or a batch with
    ``tokens``), computed once, here; or pass ``means`` from :func:`head_means` instead."""
    n_layers, n_heads = _dims(model, z_hook(layer))
    _check_index("layer", layer, n_layers)
    _check_index("head", head, n_heads)
    require_hooks(model, [z_hook(layer)])
    if (reference is None) == (means is None):
        raise ValueError("pass exactly one of reference (tokens or a batch) and means")
    if means is None:
        means = head_means(model, reference)
    return _replace_head(layer, head, means[layer][head], f"mean L{layer}H{head}")


def remove_shift(model: Any, layer: int, kv_head: int, which: str) -> Ablation:
    """Unshift KV head ``kv_head`` of layer ``layer`` for projection ``which``: its coefficients
    become the identity ``(1, 0, ..., 0)`` through ``blocks.{layer}.attn.hook_shift_{which}``, so
    ``K' = K`` (``which="k"``) or ``V' = V`` (``which="v"``) for that head. Under grouped-query
    attention a KV head serves ``n_heads / n_key_value_heads`` query heads; all of them lose the
    shift.

    Raises:
        ValueError: naming the coefficient hook when the model does not shift ``which`` in that
            layer (a vanilla model, or ``shift_k=False``).
    """
    name = shift_hook(layer, which)
    n_layers, n_heads = _dims(model, name)
    _check_index("layer", layer, n_layers)
    n = _n_kv_heads(model) if which in ("k", "v") else n_heads
    require_hooks(model, [name])
    _check_index("kv_head" if which in ("k", "v") else "head", kv_head, n)

    def fn(coeffs: Tensor, hook: Any) -> Tensor:
        if coeffs.ndim != 2 or coeffs.shape[0] <= kv_head:
            raise ValueError(
                f"{name} carries coefficients of shape {tuple(coeffs.shape)}; expected "
                f"[heads > {kv_head}, lag]")
        out = coeffs.clone()  # the input may be the parameter itself: never write to it
        out[kv_head] = 0
        out[kv_head, 0] = 1
        return out

    return Ablation(name, fn, f"no {which}-shift L{layer}KV{kv_head}")


def remove_key_shift(model: Any, layer: int, kv_head: int) -> Ablation:
    """:func:`remove_shift` for keys: ``K' = K`` for that KV head."""
    return remove_shift(model, layer, kv_head, "k")


def remove_value_shift(model: Any, layer: int, kv_head: int) -> Ablation:
    """:func:`remove_shift` for values: ``V' = V`` for that KV head."""
    return remove_shift(model, layer, kv_head, "v")


# --------------------------------------------------------------------------------------------- effects


@torch.no_grad()
def masked_metrics(logits: Float[Tensor, "batch pos d_vocab"], batch: Any) -> dict[str, float]:
    """Accuracy and cross-entropy of ``logits[:, t]`` against ``tokens[:, t + 1]`` over the
    positions where ``batch.mask`` is True (the definition of ``kvshift_lens.data.tasks``)."""
    logits = logits.detach()
    mask = batch.mask.to(logits.device)
    tokens = batch.tokens.to(logits.device)
    if logits.shape[:2] != tokens.shape or mask.shape != tokens.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)}, tokens {tuple(tokens.shape)} and mask "
            f"{tuple(mask.shape)} must agree on [batch, pos]")
    if bool(mask[:, -1].any()):
        raise ValueError("mask must be False at the last position, which has no next token")
    sel = logits[mask]
    target = tokens[:, 1:][mask[:, :-1]]
    if target.numel() == 0:
        raise ValueError("the batch has no masked positions, so there is nothing to score")
    # The loss as kvshift_lens.data.tasks computes it: ignored targets where mask is False.
    targets = torch.full_like(tokens, -100)
    targets[:, :-1] = tokens[:, 1:]
    targets = targets.masked_fill(~mask, -100)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    return {
        "accuracy": float((sel.argmax(-1) == target).float().mean()),
        "loss": float(loss),
        "n_predictions": float(target.numel()),
    }


def resolve_batch(
    task_or_batch: SyntheticTask | Batch, batch_size: int = 128, seed: int = 0
) -> tuple[Any, Callable[[Tensor, Any], dict[str, float]]]:
    """``(batch, metrics_fn)`` from a task (a batch is drawn from ``torch.Generator`` seeded with
    ``seed``; its own ``metrics`` scores it) or from a batch with ``tokens`` and ``mask``
    (scored by :func:`masked_metrics`)."""
    if callable(getattr(task_or_batch, "sample", None)) and callable(
            getattr(task_or_batch, "metrics", None)):
        batch = task_or_batch.sample(batch_size, torch.Generator().manual_seed(seed))  # on CPU
        return batch, task_or_batch.metrics
    if isinstance(getattr(task_or_batch, "tokens", None), Tensor) and isinstance(
            getattr(task_or_batch, "mask", None), Tensor):
        return task_or_batch, masked_metrics
    raise TypeError(
        "expected a task (with sample() and metrics()) or a batch (with tokens and mask), got "
        f"{type(task_or_batch).__name__}")


def _on_model_device(model: Any, batch: Any) -> Any:
    """The batch moved to the model's device (task metrics index logits with the batch's mask)."""
    device = model_device(model)
    if batch.tokens.device != device and callable(getattr(batch, "to", None)):
        return batch.to(device)
    return batch


def _as_fwd_hooks(ablations: Ablation | tuple | Sequence) -> list[tuple[str, HookFn]]:
    if isinstance(ablations, Ablation):
        ablations = [ablations]
    elif isinstance(ablations, tuple) and len(ablations) == 2 and isinstance(ablations[0], str):
        ablations = [ablations]
    out = []
    for a in ablations:
        if isinstance(a, Ablation):
            out.append(a.fwd_hook)
        elif isinstance(a, tuple) and len(a) == 2 and isinstance(a[0], str) and callable(a[1]):
            out.append(a)
        else:
            raise TypeError(f"an ablation must be an Ablation or a (hook_name, fn) pair, got {a!r}")
    return out


def _label(ablations: Any) -> list[str]:
    if isinstance(ablations, Ablation):
        return [ablations.label]
    if isinstance(ablations, tuple) and len(ablations) == 2 and isinstance(ablations[0], str):
        return [ablations[0]]
    return [a.label if isinstance(a, Ablation) else a[0] for a in ablations]


@dataclass(frozen=True)
class AblationEffect:
    """Task metrics on masked positions without and with a set of ablations (applied together)."""

    labels: list[str]
    accuracy_before: float
    accuracy_after: float
    loss_before: float
    loss_after: float
    n_predictions: int

    @property
    def accuracy_drop(self) -> float:
        """``accuracy_before - accuracy_after`` (positive: the ablation hurts)."""
        return self.accuracy_before - self.accuracy_after

    @property
    def loss_increase(self) -> float:
        """``loss_after - loss_before`` in nats."""
        return self.loss_after - self.loss_before


@torch.no_grad()
def ablation_effect(
    model: Any,
    task_or_batch: SyntheticTask | Batch,
    ablations: Ablation | Sequence[Ablation | tuple[str, HookFn]],
    batch_size: int = 128,
    seed: int = 0,
) -> AblationEffect:
    """Loss and accuracy on the task's masked positions, unablated and with every ablation in
    ``ablations`` applied at once (an empty list gives ``after == before``).

    Args:
        model: a TransformerLens-style model.
        task_or_batch: a task (``batch_size`` sequences drawn with seed ``seed``) or a batch.
        ablations: :class:`Ablation` objects, or ``(hook_name, fn)`` pairs.
    """
    hooks = _as_fwd_hooks(ablations)
    if hooks:
        require_hooks(model, [name for name, _ in hooks])
    batch, metrics = resolve_batch(task_or_batch, batch_size, seed)
    batch = _on_model_device(model, batch)
    tokens = prepare_tokens(model, batch.tokens)
    before = metrics(model(tokens), batch)
    after = metrics(model.run_with_hooks(tokens, fwd_hooks=hooks), batch) if hooks else before
    return AblationEffect(
        labels=_label(ablations),
        accuracy_before=before["accuracy"],
        accuracy_after=after["accuracy"],
        loss_before=before["loss"],
        loss_after=after["loss"],
        n_predictions=int(before["n_predictions"]),
    )


@dataclass(frozen=True)
class AblationTable:
    """One ablation per cell, applied alone: ``accuracy`` and ``loss`` after it, ``[layer, head]``
    (KV heads for shift ablations), with the unablated baseline."""

    kind: str
    accuracy: Float[Tensor, "layer head"]
    loss: Float[Tensor, "layer head"]
    accuracy_before: float
    loss_before: float

    @property
    def accuracy_drop(self) -> Float[Tensor, "layer head"]:
        """``accuracy_before - accuracy`` per cell."""
        return self.accuracy_before - self.accuracy

    @property
    def loss_increase(self) -> Float[Tensor, "layer head"]:
        return self.loss - self.loss_before

    def ranked(self) -> list[tuple[int, int, float]]:
        """``(layer, head, accuracy_drop)`` from the most to the least harmful ablation."""
        drop = self.accuracy_drop
        order = drop.flatten().argsort(descending=True, stable=True).tolist()
        n_heads = drop.shape[1]
        return [(i // n_heads, i % n_heads, float(drop.flatten()[i])) for i in order]


@torch.no_grad()
def _table(model: Any, batch: Any, metrics: Callable, kind: str,
           make: Callable[[int, int], Ablation], n_layers: int, n_heads: int) -> AblationTable:
    batch = _on_model_device(model, batch)
    tokens = prepare_tokens(model, batch.tokens)
    before = metrics(model(tokens), batch)
    acc = torch.empty(n_layers, n_heads)
    loss = torch.empty(n_layers, n_heads)
    for layer in range(n_layers):
        for head in range(n_heads):
            out = metrics(model.run_with_hooks(tokens, fwd_hooks=[make(layer, head).fwd_hook]), batch)
            acc[layer, head], loss[layer, head] = out["accuracy"], out["loss"]
    return AblationTable(kind, acc, loss, before["accuracy"], before["loss"])


def ablate_each_head(
    model: Any,
    task_or_batch: SyntheticTask | Batch,
    method: str = "zero",
    batch_size: int = 128,
    seed: int = 0,
    reference: Tensor | Batch | None = None,
) -> AblationTable:
    """Zero- or mean-ablate every head in turn (``method`` "zero" or "mean"; the mean is taken over
    ``reference``, by default the evaluation batch itself) and tabulate accuracy and loss
    ``[layer, head]``; ``.accuracy_drop`` is the table of drops."""
    if method not in ("zero", "mean"):
        raise ValueError(f"method={method!r} must be 'zero' or 'mean'")
    n_layers, n_heads = _dims(model, z_hook(0))
    require_hooks(model, [z_hook(layer) for layer in range(n_layers)])
    batch, metrics = resolve_batch(task_or_batch, batch_size, seed)
    if method == "zero":
        def make(layer: int, head: int) -> Ablation:
            return zero_ablate_head(model, layer, head)
    else:
        means = head_means(model, batch.tokens if reference is None else reference)

        def make(layer: int, head: int) -> Ablation:
            return mean_ablate_head(model, layer, head, means=means)
    return _table(model, batch, metrics, f"{method} head", make, n_layers, n_heads)


def ablate_each_shift(
    model: Any,
    task_or_batch: SyntheticTask | Batch,
    which: str = "k",
    batch_size: int = 128,
    seed: int = 0,
) -> AblationTable:
    """Remove the ``which`` ("k" or "v") shift of every (layer, KV head) in turn
    (:func:`remove_shift`) and tabulate accuracy and loss ``[layer, kv_head]``."""
    if which not in ("k", "v"):
        raise ValueError(f"which={which!r} must be 'k' or 'v'")
    n_layers, _ = _dims(model, shift_hook(0, which))
    require_hooks(model, [shift_hook(layer, which) for layer in range(n_layers)])
    batch, metrics = resolve_batch(task_or_batch, batch_size, seed)
    return _table(model, batch, metrics, f"remove {which}-shift",
                  lambda layer, head: remove_shift(model, layer, head, which),
                  n_layers, _n_kv_heads(model))


__all__ = [
    "Ablation",
    "AblationEffect",
    "AblationTable",
    "ablate_each_head",
    "ablate_each_shift",
    "ablation_effect",
    "masked_metrics",
    "head_means",
    "mean_ablate_head",
    "remove_key_shift",
    "remove_shift",
    "remove_value_shift",
    "resolve_batch",
    "shift_hook",
    "z_hook",
    "zero_ablate_head",
]
