"""Activation patching by full hook name: the shift hooks, the coefficients, and everything else.

TransformerLens' ``patching.generic_activation_patch`` names the hook it patches with
``utils.get_act_name(activation_name, layer=index[0])``. Given a layer, ``get_act_name`` always
builds ``blocks.{layer}.[attn.|mlp.]hook_{name}`` from a short name it knows; it cannot produce a
custom hook such as ``blocks.0.attn.hook_k_shifted`` (it returns
``blocks.0.hook_blocks.0.attn.hook_k_shifted`` for the full name and ``blocks.0.hook_k_shifted``
for ``"k_shifted"``). :func:`patch_by_name` therefore takes full hook names. For a name that
``get_act_name`` does reproduce (``blocks.{l}.attn.hook_z``, ``hook_v``, ``blocks.{l}.hook_resid_pre``
...) it calls ``generic_activation_patch`` itself with an explicit ``index_df``; for the others
(``hook_{q,k,v}_shifted``, ``hook_shift_{q,k,v}``) it runs the same loop here: one corrupted
forward pass per cell, with a hook that writes the clean activation into the cell. Both paths use
the same patch setters and give the same numbers.

Where the shift sits (DESIGN.md)::

    hook_k / hook_v  [b, p, kv_head, d]   raw projections of each token
    hook_shift_k / hook_shift_v  [kv_head, lag]   the coefficients
    hook_k_shifted / hook_v_shifted  [b, p, kv_head, d]   K'_t = sum_l a_l K_{t-l}, what attention reads

**Patching a raw projection at one position reaches two shifted positions.** With window 1,
``V'_j = b1 V_j + b2 V_{j-1}`` and ``V'_{j+1} = b1 V_{j+1} + b2 V_j``: patching ``hook_v`` (or
``hook_k``) at position j changes ``V'`` (``K'``) at j *and* j+1 (j .. j+w for window w), so a
per-position sweep over ``hook_v`` attributes to position j an effect that partly happens through
position j+1. Patching ``hook_v_shifted`` / ``hook_k_shifted`` at j changes exactly what attention
consumes at j.

**Coefficients are weights, not activations.** ``hook_shift_*`` carries the same tensor on every
input, so patching it from a clean run of the *same* model into a corrupted run changes nothing.
It is meaningful with a ``clean_cache`` from another model (an earlier checkpoint, a vanilla twin,
a model trained on another task) or from a run with an ablation hook: the corrupted run then uses
those coefficients and the model's own other weights. Coefficient hooks have no position axis:
patch them whole (``index="all"``) or per KV head (``index="head"``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import patching as tl_patching
from transformer_lens import utilities as tl_utils

from probes._hooks import prepare_tokens, require_hooks

INDEX_KINDS = ("all", "pos", "head", "pos_head")
"""What one patch covers: the whole tensor, one position, one head (all positions), or one
(position, head) cell."""

MetricFn = Callable[[Float[Tensor, "batch pos d_vocab"]], Tensor | float]


def hook_layout(hook_name: str, shape: Sequence[int]) -> tuple[int | None, int | None]:
    """``(pos_dim, head_dim)`` of an activation of hook ``hook_name`` with ``shape`` (batch
    included), None where the axis does not exist.

    Coefficient hooks (``hook_shift_*``) are ``[head, lag]``; attention patterns and scores are
    ``[batch, head, query_pos, key_pos]`` (patched per head; not per position, which would be
    ambiguous); every other hook is ``[batch, pos, ...]`` with heads on dim 2 when 4-D.
    """
    leaf = hook_name.rsplit(".", 1)[-1]
    if leaf.startswith("hook_shift_"):
        return None, 0
    if leaf in ("hook_pattern", "hook_attn_scores"):
        return None, 1
    if len(shape) < 2:
        raise ValueError(f"{hook_name} has shape {tuple(shape)}; expected [batch, pos, ...]")
    return 1, (2 if len(shape) == 4 else None)


def _axes_for(hook_name: str, shape: Sequence[int], index: str) -> tuple[list[str], list[int]]:
    pos_dim, head_dim = hook_layout(hook_name, shape)
    need = {"all": [], "pos": ["pos"], "head": ["head"], "pos_head": ["pos", "head"]}[index]
    dims = {"pos": pos_dim, "head": head_dim}
    missing = [axis for axis in need if dims[axis] is None]
    if missing:
        raise ValueError(
            f"index={index!r} needs a {' and a '.join(missing)} axis, which {hook_name} (shape "
            f"{tuple(shape)}) does not have; coefficient hooks take 'all' or 'head', attention "
            f"patterns 'all' or 'head', [batch, pos, d] hooks 'all' or 'pos'")
    return need, [shape[dims[axis]] for axis in need]


def make_patch_setter(hook_name: str, shape: Sequence[int], index: str) -> Callable:
    """A ``(corrupted_activation, index_row, clean_activation) -> patched`` setter in
    TransformerLens' convention (``index_row[0]`` is the layer column, the rest the cell), writing
    the clean activation into a copy of the corrupted one."""
    pos_dim, head_dim = hook_layout(hook_name, shape)

    def setter(corrupted: Tensor, index_row: Sequence[int], clean: Tensor) -> Tensor:
        if tuple(clean.shape) != tuple(corrupted.shape):
            raise ValueError(
                f"{hook_name}: the clean activation has shape {tuple(clean.shape)} but the "
                f"corrupted run's has {tuple(corrupted.shape)}; clean and corrupted inputs must "
                "have the same shape")
        clean = clean.to(device=corrupted.device, dtype=corrupted.dtype)
        if index == "all":
            return clean.clone()
        cell = [int(i) for i in index_row[1:]]
        sel: list[Any] = [slice(None)] * corrupted.ndim
        if index == "pos":
            sel[pos_dim] = cell[0]
        elif index == "head":
            sel[head_dim] = cell[0]
        else:
            sel[pos_dim], sel[head_dim] = cell
        out = corrupted.clone()
        out[tuple(sel)] = clean[tuple(sel)]
        return out

    return setter


def _tl_short_name(hook_name: str) -> str | None:
    """The short name that ``get_act_name(short, layer=l)`` expands back to ``hook_name``, if any."""
    m = re.fullmatch(r"blocks\.(\d+)\.(?:attn\.|mlp\.)?hook_(\w+)", hook_name)
    if m is None:
        return None
    short = m.group(2)
    try:
        return short if tl_utils.get_act_name(short, layer=int(m.group(1))) == hook_name else None
    except Exception:  # pragma: no cover - get_act_name is pure string work
        return None


def _layer_of(hook_name: str) -> int:
    m = re.match(r"blocks\.(\d+)\.", hook_name)
    return int(m.group(1)) if m else 0


def _scalar(value: Tensor | float) -> float:
    t = torch.as_tensor(value)
    if t.numel() != 1:
        raise ValueError(f"metric must return a scalar, got shape {tuple(t.shape)}")
    return float(t)


@dataclass(frozen=True)
class NamePatchResult:
    """The metric after each patch, per hook name.

    ``values[name]`` has one axis per entry of ``axes[name]`` (``()`` for ``index="all"``:
    a 0-d tensor; ``("pos",)``, ``("head",)`` or ``("pos", "head")`` otherwise).
    ``corrupted_value`` is the metric on the unpatched corrupted run, ``clean_value`` on the clean
    run (None when a ``clean_cache`` was passed without clean tokens).
    """

    values: dict[str, Tensor]
    axes: dict[str, tuple[str, ...]]
    index: str
    corrupted_value: float
    clean_value: float | None

    def __getitem__(self, hook_name: str) -> Tensor:
        return self.values[hook_name]

    def normalized(self, hook_name: str) -> Tensor:
        """``(value - corrupted) / (clean - corrupted)``: 0 = no recovery, 1 = full recovery."""
        if self.clean_value is None:
            raise ValueError("normalized() needs the clean run's metric: pass clean_tokens")
        gap = self.clean_value - self.corrupted_value
        if gap == 0:
            raise ValueError("clean and corrupted metrics are equal; nothing to normalise by")
        return (self.values[hook_name] - self.corrupted_value) / gap


def _patch_loop(model: Any, tokens: Tensor, name: str, clean: Tensor, setter: Callable,
                index_df: pd.DataFrame, metric: MetricFn) -> Tensor:
    """``generic_activation_patch``'s loop for a hook it cannot name: one forward pass per row."""
    flat = torch.empty(len(index_df))
    for c, row in enumerate(index_df.itertuples(index=False)):
        def hook(act: Tensor, hook: Any, row: tuple = tuple(row)) -> Tensor:
            return setter(act, row, clean)
        flat[c] = _scalar(metric(model.run_with_hooks(tokens, fwd_hooks=[(name, hook)])))
    return flat


def _require_eval(model: Any) -> None:
    if getattr(model, "training", False):
        raise ValueError("activation patching needs the model in eval mode: call model.eval() first")


@torch.no_grad()
def patch_by_name(
    model: Any,
    clean_tokens: Tensor | None,
    corrupted_tokens: Tensor,
    hook_names: str | Sequence[str],
    metric: MetricFn,
    index: str = "all",
    clean_cache: Mapping[str, Tensor] | None = None,
) -> NamePatchResult:
    """Patch the clean activation of each hook in ``hook_names`` into the corrupted run, one cell
    at a time, and record ``metric(patched_logits)``.

    Args:
        model: a TransformerLens-style model in eval mode.
        clean_tokens: ``[batch, pos]`` token ids of the clean run (may be None when
            ``clean_cache`` is given).
        corrupted_tokens: ``[batch, pos]``, the same shape as ``clean_tokens`` for any hook with
            a position axis (batch > 1 is fine: every patch runs the whole batch).
        hook_names: FULL hook names (``blocks.0.attn.hook_k_shifted``, ``blocks.0.attn.hook_shift_k``,
            ``blocks.1.attn.hook_z`` ...); each is patched separately.
        metric: logits ``[batch, pos, d_vocab]`` -> scalar.
        index: "all" (one patch: the whole tensor), "pos" (one patch per position, every head),
            "head" (per head, every position; per KV head for ``hook_k``/``hook_v``/shifted hooks
            and coefficients), "pos_head" (per position and head). Under the shift, patching
            ``hook_v`` (``hook_k``) at position j changes ``V'`` (``K'``) at j *and* j+1 (j .. j+w
            for window w); patch ``hook_v_shifted`` / ``hook_k_shifted`` to change position j only.
        clean_cache: activations to patch in, by full hook name (for instance from another model's
            ``run_with_cache``); by default the clean run's.

    Returns:
        a :class:`NamePatchResult`.

    Raises:
        ValueError: for a hook the model does not have (named), an index its tensor has no axis
            for, a model in training mode, or mismatched clean/corrupted shapes.
    """
    if index not in INDEX_KINDS:
        raise ValueError(f"index={index!r} must be one of {INDEX_KINDS}")
    names = [hook_names] if isinstance(hook_names, str) else list(hook_names)
    if not names:
        raise ValueError("hook_names is empty")
    require_hooks(model, names)
    _require_eval(model)
    corrupted_tokens = prepare_tokens(model, corrupted_tokens)

    clean_value = None
    if clean_tokens is not None:
        clean_tokens = prepare_tokens(model, clean_tokens)
        logits, run_cache = model.run_with_cache(clean_tokens, names_filter=lambda n: n in names)
        clean_value = _scalar(metric(logits))
        if clean_cache is None:
            clean_cache = {name: run_cache[name] for name in names}
    if clean_cache is None:
        raise ValueError("pass clean_tokens or a clean_cache to patch from")
    absent = [name for name in names if name not in clean_cache]
    if absent:
        raise ValueError(f"clean_cache has no activation for {absent}")
    corrupted_value = _scalar(metric(model(corrupted_tokens)))

    values, axes = {}, {}
    for name in names:
        clean = clean_cache[name]
        axis_names, sizes = _axes_for(name, clean.shape, index)
        setter = make_patch_setter(name, clean.shape, index)
        rows = pd.MultiIndex.from_product([range(n) for n in sizes]).to_frame(index=False) if sizes \
            else pd.DataFrame(index=range(1))
        index_df = pd.concat([pd.DataFrame({"layer": [_layer_of(name)] * len(rows)}),
                              rows.set_axis(axis_names, axis=1)], axis=1)
        short = _tl_short_name(name)
        if short is not None:
            flat = tl_patching.generic_activation_patch(
                model, corrupted_tokens, {name: clean}, metric, setter, short, index_df=index_df)
        else:
            flat = _patch_loop(model, corrupted_tokens, name, clean, setter, index_df, metric)
        values[name] = flat.detach().float().cpu().reshape(sizes)
        axes[name] = tuple(axis_names)
    return NamePatchResult(values, axes, index, corrupted_value, clean_value)


@torch.no_grad()
def run_with_patches(
    model: Any,
    tokens: Tensor,
    patches: Mapping[str, Tensor],
    pos: int | None = None,
    head: int | None = None,
) -> Float[Tensor, "batch pos d_vocab"]:
    """Run ``tokens`` with every hook in ``patches`` (full names) overwritten by the given
    activation: whole tensors by default, or only position ``pos`` and/or head ``head`` (one
    forward pass, all patches together). Returns the logits."""
    require_hooks(model, list(patches))
    tokens = prepare_tokens(model, tokens)
    index = "all" if pos is None and head is None else (
        "pos" if head is None else "head" if pos is None else "pos_head")
    cell = [c for c in (pos, head) if c is not None]
    hooks = []
    for name, value in patches.items():
        _axes_for(name, value.shape, index)
        setter = make_patch_setter(name, value.shape, index)

        def hook(act: Tensor, hook: Any, setter: Callable = setter, value: Tensor = value) -> Tensor:
            return setter(act, [0, *cell], value)
        hooks.append((name, hook))
    return model.run_with_hooks(tokens, fwd_hooks=hooks)


__all__ = [
    "INDEX_KINDS",
    "NamePatchResult",
    "hook_layout",
    "make_patch_setter",
    "patch_by_name",
    "run_with_patches",
]
