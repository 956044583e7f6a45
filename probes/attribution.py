"""Attribution patching: the first-order estimate of activation patching, for every hook at once.

Activation patching (:mod:`probes.patching`) runs the model once per patched cell. Attribution
patching (Nanda 2023) replaces each of those runs by a linear estimate. For a scalar metric ``M`` of
the logits and an activation ``a`` at hook ``h``::

    M(run with a_h <- a'_h) - M(run)  ~=  sum over the cell of (a'_h - a_h) . dM/da_h

where the gradient is taken on the run being patched. Two directions, same cost:

- ``direction="noising"`` (default): the gradient on the **clean** run, ``a' - a`` = corrupted
  minus clean. Estimates ``M(clean, a <- corrupted) - M(clean)``: how much the metric falls when
  that cell is corrupted. Cost: one clean forward + backward and one corrupted forward.
- ``direction="denoising"``: the gradient on the **corrupted** run, ``a' - a`` = clean minus
  corrupted. Estimates ``M(corrupted, a <- clean) - M(corrupted)``, which is what
  :func:`probes.patching.patch_by_name` measures minus its ``corrupted_value``. Cost: one corrupted
  forward + backward and one clean forward.

Every requested hook comes from those same two passes, however many hooks and cells there are.

**Cells.** Attributions are summed over the batch and over the feature axis (``d_head``,
``d_model``, ``d_mlp``), and kept per position and head where the hook has those axes (the cells of
``patch_by_name(index="pos_head")``; patching a cell there patches it in every batch row at once):

=======================================================  ==================================
hook                                                     axes of the attribution
=======================================================  ==================================
``[batch, pos, d]`` (resid, attn_out, mlp_out, embed)    ``("pos",)``
``[batch, pos, head, d]`` (q, k, v, z, result, shifted)  ``("pos", "head")`` (KV heads for k/v)
``hook_attn_scores`` / ``hook_pattern``                  ``("head", "query_pos", "key_pos")``
``hook_shift_{q,k,v}`` ``[head, lag]``                   ``("head", "lag")``
=======================================================  ==================================

**Where the estimate is exact.** It is exact when the metric is linear in the activation over the
segment between the two values: e.g. a metric linear in the logits of an attention-only model
without a final norm is linear in each last-layer head's ``hook_z``, ``hook_result``,
``hook_v_shifted``, ``hook_v`` (given the pattern, which values do not change) and in
``hook_shift_v``. It breaks where the metric bends between the two values: through a saturated
softmax (a score change that moves attention from 0 to 1 has near-zero gradient at either end), a
norm's scale, or any activation whose patch reaches the output through an attention pattern.
:func:`exact_patching_effects` runs the exact patches for comparison and :func:`agreement` reports
how well the two agree.

**Coefficients.** ``hook_shift_*`` carries the same tensor on every input of one model, so the
attribution to coefficients between two inputs is zero. It becomes informative when the corrupted
side comes from elsewhere: pass ``corrupted_cache={name: coefficients}`` (an earlier checkpoint,
the identity ``(1, 0, ...)`` for "remove the shift", another model's values).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from probes._hooks import prepare_tokens, require_hooks
from probes.patching import hook_layout, patch_by_name

logger = logging.getLogger(__name__)

MetricFn = Callable[[Float[Tensor, "batch pos d_vocab"]], Tensor]
DIRECTIONS = ("noising", "denoising")
HookNames = str | Sequence[str] | Callable[[str], bool]


def _is_attention_map(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in ("hook_pattern", "hook_attn_scores")


def _is_coefficient(name: str) -> bool:
    return name.rsplit(".", 1)[-1].startswith("hook_shift_")


def cell_axes(hook_name: str, shape: Sequence[int]) -> tuple[str, ...]:
    """The axes an attribution at ``hook_name`` (activation ``shape``, batch included) keeps."""
    if _is_coefficient(hook_name):
        return ("head", "lag")
    if _is_attention_map(hook_name):
        return ("head", "query_pos", "key_pos")
    _, head_dim = hook_layout(hook_name, shape)
    return ("pos",) if head_dim is None else ("pos", "head")


def _reduce_cells(hook_name: str, product: Tensor) -> Tensor:
    """Sum ``delta * grad`` (the activation's shape) down to :func:`cell_axes`."""
    if _is_coefficient(hook_name):
        return product
    if _is_attention_map(hook_name):
        return product.sum(0)  # [head, query_pos, key_pos]
    _, head_dim = hook_layout(hook_name, product.shape)
    keep = (1,) if head_dim is None else (1, head_dim)
    return product.sum(dim=[d for d in range(product.ndim) if d not in keep])


_FLAGGED = {"hook_result": "use_attn_result", "hook_q_input": "use_split_qkv_input",
            "hook_k_input": "use_split_qkv_input", "hook_v_input": "use_split_qkv_input",
            "hook_attn_in": "use_attn_in", "hook_mlp_in": "use_hook_mlp_in"}


def _fires(model: Any, name: str) -> bool:
    """False for a hook whose flag (``cfg.use_attn_result`` ...) is off: it exists but never runs."""
    flag = _FLAGGED.get(name.rsplit(".", 1)[-1])
    return flag is None or bool(getattr(model.cfg, flag, False))


def resolve_hook_names(model: Any, hook_names: HookNames) -> list[str]:
    """``hook_names`` (a full name, a list of them, or a predicate on names) as a list of full
    names that ``model`` has; ValueError naming what is missing. A predicate selects, in the
    model's hook order, the hooks that run (not those whose flag, e.g. ``use_attn_result``, is
    off); a hook named explicitly must run."""
    if callable(hook_names) and not isinstance(hook_names, str):
        names = [name for name in model.hook_dict if hook_names(name) and _fires(model, name)]
        if not names:
            raise ValueError("hook_names (a predicate) matched none of the model's active hook points")
        return names
    names = [hook_names] if isinstance(hook_names, str) else list(hook_names)
    if not names:
        raise ValueError("hook_names is empty")
    if len(set(names)) != len(names):
        raise ValueError(f"hook_names has duplicates: {names}")
    require_hooks(model, names)
    return names


@dataclass(frozen=True)
class AttributionResult:
    """Attribution-patching estimates, per hook.

    Attributes:
        values: ``values[name]`` is the estimated change of the metric when each cell of that hook
            is patched, with one axis per entry of ``axes[name]`` (see the module docstring).
        axes: the axis names of each ``values`` tensor.
        direction: "noising" (estimates ``M(clean, cell <- corrupted) - M(clean)``) or "denoising"
            (``M(corrupted, cell <- clean) - M(corrupted)``).
        clean_value: the metric on the clean run.
        corrupted_value: the metric on the corrupted run (None when the corrupted side came from a
            ``corrupted_cache`` alone).
    """

    values: dict[str, Tensor]
    axes: dict[str, tuple[str, ...]]
    direction: str
    clean_value: float
    corrupted_value: float | None

    def __getitem__(self, hook_name: str) -> Tensor:
        if hook_name not in self.values:
            raise KeyError(f"{hook_name!r} was not attributed; attributed: {list(self.values)}")
        return self.values[hook_name]

    def reduce(self, hook_name: str, index: str = "pos_head") -> Tensor:
        """The attribution of ``hook_name`` summed to the cells of ``patch_by_name(index=...)``:
        "all" (a 0-d tensor), "pos", "head" or "pos_head" (the linear estimate of patching a
        union of cells is the sum of theirs)."""
        value, axes = self[hook_name], self.axes[hook_name]
        keep = {"all": (), "pos": ("pos",), "head": ("head",), "pos_head": ("pos", "head")}.get(index)
        if keep is None:
            raise ValueError(f"index={index!r} must be one of 'all', 'pos', 'head', 'pos_head'")
        missing = [a for a in keep if a not in axes]
        if missing:
            raise ValueError(f"{hook_name} has axes {axes}, no {missing[0]!r} to keep for index={index!r}")
        drop = [i for i, a in enumerate(axes) if a not in keep]
        return value.sum(dim=drop) if drop else value.clone()

    def head_table(self, hook_suffix: str = "attn.hook_z") -> Float[Tensor, "layer head"]:
        """``[layer, head]``: the per-head attribution of ``blocks.{l}.<hook_suffix>`` summed over
        positions (and lags, query and key positions), for every layer that was attributed; layers
        whose hook was not attributed are NaN. KV heads for k/v hooks under grouped-query
        attention."""
        found = {}
        for name in self.values:
            parts = name.split(".", 2)
            if len(parts) == 3 and parts[0] == "blocks" and parts[2] == hook_suffix:
                found[int(parts[1])] = self.reduce(name, "head")
        if not found:
            raise ValueError(f"no attributed hook ends in {hook_suffix!r}; attributed: {list(self.values)}")
        n_layers = max(found) + 1
        n = max(t.shape[0] for t in found.values())
        out = torch.full((n_layers, n), math.nan)
        for layer, t in found.items():
            out[layer, : t.shape[0]] = t
        return out

    def to_pandas(self) -> pd.DataFrame:
        """Long format: one row per (hook, cell) with its attribution (``value``)."""
        rows = []
        for name, value in self.values.items():
            axes = self.axes[name]
            grid = torch.cartesian_prod(*[torch.arange(n) for n in value.shape]).reshape(-1, len(axes))
            for idx, v in zip(grid.tolist(), value.flatten().tolist()):
                rows.append({"hook": name, **dict(zip(axes, idx)), "value": v})
        return pd.DataFrame.from_records(rows)


def _scalar_metric(value: Any) -> Tensor:
    if not isinstance(value, Tensor) or value.numel() != 1:
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"metric must return a scalar tensor (differentiable in the logits), got {shape}")
    return value.reshape(())


def _require_eval(model: Any) -> None:
    if getattr(model, "training", False):
        raise ValueError("attribution needs the model in eval mode: call model.eval() first")


def capture_hooks(names: Sequence[str], store: dict[str, Tensor]) -> list[tuple[str, Callable]]:
    """Forward hooks that keep each named activation (the tensor in the graph) in ``store``.

    With gradients on, an activation that does not require grad (a model with frozen weights) is
    replaced by a detached copy that does: nothing upstream of it can need a gradient through it
    then. With gradients off, the stored tensors are detached.
    """

    def keep(act: Tensor, hook: Any) -> Tensor | None:
        if not torch.is_grad_enabled():
            # (a view of a parameter made under no_grad still says requires_grad=True)
            store[hook.name] = act.detach()
            return None
        if act.is_floating_point() and not act.requires_grad:
            act = act.detach().requires_grad_(True)
            store[hook.name] = act
            return act
        store[hook.name] = act
        return None

    return [(name, keep) for name in names]


def run_and_grad(
    model: Any,
    tokens: Int[Tensor, "batch pos"],
    metric: MetricFn,
    names: Sequence[str],
    extra_fwd_hooks: Sequence[tuple[str, Callable]] = (),
) -> tuple[float, dict[str, Tensor], dict[str, Tensor]]:
    """One forward and one backward pass: ``(metric value, activations, gradients)`` at ``names``
    (gradients of hooks the metric does not depend on are zeros). Parameters' ``.grad`` are left
    untouched."""
    acts: dict[str, Tensor] = {}
    with torch.enable_grad(), model.hooks(fwd_hooks=[*extra_fwd_hooks, *capture_hooks(names, acts)]):
        value = _scalar_metric(metric(model(tokens)))
    _check_fired(names, acts)
    if not value.requires_grad:
        raise ValueError("the metric does not depend on the model's activations (no gradient)")
    grads = torch.autograd.grad(value, [acts[n] for n in names], allow_unused=True)
    out = {n: torch.zeros_like(acts[n]) if g is None else g for n, g in zip(names, grads)}
    return float(value.detach()), {n: a.detach() for n, a in acts.items()}, out


def _check_fired(names: Sequence[str], acts: Mapping[str, Tensor]) -> None:
    missing = [n for n in names if n not in acts]
    if missing:
        raise ValueError(
            f"the hooks {missing} did not fire on this model's forward pass; some hooks only run "
            "with a flag on (hook_result: use_attn_result; hook_q/k/v_input: use_split_qkv_input; "
            "hook_attn_in: use_attn_in; hook_mlp_in: use_hook_mlp_in)")


@torch.no_grad()
def run_and_cache(
    model: Any, tokens: Int[Tensor, "batch pos"], metric: MetricFn | None, names: Sequence[str]
) -> tuple[float | None, dict[str, Tensor]]:
    """One forward pass (no gradient): ``(metric value or None, activations at names)``."""
    acts: dict[str, Tensor] = {}
    with model.hooks(fwd_hooks=capture_hooks(names, acts)):
        logits = model(tokens)
    _check_fired(names, acts)
    value = None if metric is None else float(_scalar_metric(metric(logits)))
    return value, acts


def attribution_patch(
    model: Any,
    clean_tokens: Int[Tensor, "batch pos"],
    corrupted_tokens: Int[Tensor, "batch pos"] | None,
    metric: MetricFn,
    hook_names: HookNames,
    direction: str = "noising",
    corrupted_cache: Mapping[str, Tensor] | None = None,
) -> AttributionResult:
    """Attribution patching over any set of hooks, from two passes (see the module docstring).

    Args:
        model: a TransformerLens-style model in eval mode.
        clean_tokens: ``[batch, pos]`` token ids of the clean run.
        corrupted_tokens: ``[batch, pos]``, the same shape (None when ``corrupted_cache`` supplies
            every hook and ``direction="noising"``).
        metric: logits ``[batch, pos, d_vocab]`` -> a scalar tensor, differentiable.
        hook_names: FULL hook names (``blocks.0.attn.hook_k_shifted``, ``blocks.0.attn.hook_shift_v``,
            ``blocks.1.attn.hook_z``, ``blocks.0.attn.hook_pattern`` ...), or a predicate on names.
        direction: "noising" (gradient on the clean run) or "denoising" (on the corrupted run).
        corrupted_cache: activations to use as the corrupted side, by full hook name, overriding
            the corrupted run's (for coefficients: another model's or the identity).

    Returns:
        an :class:`AttributionResult`.

    Raises:
        ValueError: an unknown hook (named), a direction not in ``DIRECTIONS``, a model in
            training mode, clean and corrupted activations of different shapes, a metric that is
            not a differentiable scalar, or a non-finite attribution.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction={direction!r} must be one of {DIRECTIONS}")
    _require_eval(model)
    names = resolve_hook_names(model, hook_names)
    clean_tokens = prepare_tokens(model, clean_tokens)
    override = dict(corrupted_cache or {})
    unknown = [n for n in override if n not in names]
    if unknown:
        raise ValueError(f"corrupted_cache has activations for {unknown}, which are not in hook_names")
    need_corrupted_run = direction == "denoising" or any(n not in override for n in names)
    if corrupted_tokens is None and need_corrupted_run:
        raise ValueError("pass corrupted_tokens (or a corrupted_cache for every hook, with "
                         "direction='noising')")
    if corrupted_tokens is not None:
        corrupted_tokens = prepare_tokens(model, corrupted_tokens)
        if corrupted_tokens.shape != clean_tokens.shape:
            raise ValueError(f"clean tokens {tuple(clean_tokens.shape)} and corrupted tokens "
                             f"{tuple(corrupted_tokens.shape)} must have the same shape")

    corrupted_value = None
    if direction == "noising":
        clean_value, clean_acts, grads = run_and_grad(model, clean_tokens, metric, names)
        corr_acts: dict[str, Tensor] = {}
        if need_corrupted_run:
            corrupted_value, corr_acts = run_and_cache(model, corrupted_tokens, metric, names)
        corr_acts.update(override)
        base, other = clean_acts, corr_acts
    else:
        if override:
            raise ValueError("corrupted_cache works with direction='noising' (the corrupted side "
                             "must be a run to take gradients on for 'denoising')")
        corrupted_value, corr_acts, grads = run_and_grad(model, corrupted_tokens, metric, names)
        clean_value, clean_acts = run_and_cache(model, clean_tokens, metric, names)
        base, other = corr_acts, clean_acts

    values, axes = {}, {}
    for name in names:
        a, b = base[name], other[name].to(device=base[name].device, dtype=base[name].dtype)
        if a.shape != b.shape:
            raise ValueError(f"{name}: the clean activation has shape {tuple(clean_acts[name].shape)} "
                             f"but the corrupted one {tuple(corr_acts[name].shape)}; they must agree")
        delta = b - a
        delta = torch.where(a == b, torch.zeros_like(delta), delta)  # masked scores: -inf - -inf
        cells = _reduce_cells(name, delta.double() * grads[name].double())
        if not torch.isfinite(cells).all():
            raise ValueError(f"the attribution at {name} is not finite (non-finite activations or "
                             "gradients on these inputs)")
        values[name] = cells.float().cpu()
        axes[name] = cell_axes(name, a.shape)
    return AttributionResult(values, axes, direction, clean_value, corrupted_value)


def exact_patching_effects(
    model: Any,
    clean_tokens: Int[Tensor, "batch pos"],
    corrupted_tokens: Int[Tensor, "batch pos"] | None,
    metric: MetricFn,
    hook_names: HookNames,
    index: str = "pos_head",
    direction: str = "noising",
    corrupted_cache: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """What :func:`attribution_patch` estimates, measured: exact activation patching through
    :func:`probes.patching.patch_by_name`, one forward pass per cell, as the change of the metric.

    ``direction="noising"`` patches corrupted activations into the clean run (``patch_by_name`` with
    the roles of the inputs swapped) and returns ``M(patched) - M(clean)``; "denoising" patches
    clean into corrupted and returns ``M(patched) - M(corrupted)``. ``corrupted_cache`` (noising
    only) supplies the corrupted activations, as in :func:`attribution_patch`.

    Returns:
        ``{name: effects}`` with the cells of ``patch_by_name(index=...)``, comparable with
        ``AttributionResult.reduce(name, index)``.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction={direction!r} must be one of {DIRECTIONS}")
    names = resolve_hook_names(model, hook_names)
    out = {}
    if direction == "noising":
        if corrupted_cache is None and corrupted_tokens is None:
            raise ValueError("pass corrupted_tokens or a corrupted_cache")
        source = None
        if corrupted_cache is None or any(n not in corrupted_cache for n in names):
            _, source = run_and_cache(model, prepare_tokens(model, corrupted_tokens), None, names)
        source = {**(source or {}), **(corrupted_cache or {})}
        result = patch_by_name(model, None, clean_tokens, names, metric, index=index,
                               clean_cache=source)
    else:
        if corrupted_cache is not None:
            raise ValueError("corrupted_cache works with direction='noising'")
        result = patch_by_name(model, clean_tokens, corrupted_tokens, names, metric, index=index)
    for name in names:
        out[name] = result[name] - result.corrupted_value
    return out


@dataclass(frozen=True)
class Agreement:
    """How well attribution estimates match exact patching over a set of cells.

    Attributes:
        spearman: rank correlation of the two (ties averaged); NaN when either is constant.
        pearson: linear correlation; NaN when either is constant.
        max_abs_error: the largest ``|estimate - exact|``.
        exact_scale: the largest ``|exact|`` (to read ``max_abs_error`` against).
        top_k_overlap: the fraction of the ``k`` cells with the largest ``|exact|`` that are also
            among the ``k`` largest ``|estimate|`` (``k`` = ``top_k``).
        n: the number of cells compared.
    """

    spearman: float
    pearson: float
    max_abs_error: float
    exact_scale: float
    top_k_overlap: float
    top_k: int
    n: int


def agreement(estimate: Tensor, exact: Tensor, top_k: int = 3) -> Agreement:
    """Compare attribution ``estimate`` with ``exact`` patching effects cell by cell (same shape;
    flattened; NaN cells in either are left out)."""
    estimate, exact = torch.as_tensor(estimate).double(), torch.as_tensor(exact).double()
    if estimate.shape != exact.shape:
        raise ValueError(f"estimate has shape {tuple(estimate.shape)}, exact {tuple(exact.shape)}")
    e, x = estimate.flatten(), exact.flatten()
    keep = torch.isfinite(e) & torch.isfinite(x)
    e, x = e[keep], x[keep]
    if e.numel() < 2:
        raise ValueError(f"need at least 2 finite cells to compare, got {e.numel()}")
    frame = pd.DataFrame({"estimate": e.numpy(), "exact": x.numpy()})
    spearman = float(frame.corr(method="spearman").iloc[0, 1])
    pearson = float(frame.corr(method="pearson").iloc[0, 1])
    k = min(top_k, e.numel())
    top_exact = set(x.abs().argsort(descending=True, stable=True)[:k].tolist())
    top_est = set(e.abs().argsort(descending=True, stable=True)[:k].tolist())
    return Agreement(spearman, pearson, float((e - x).abs().max()), float(x.abs().max()),
                     len(top_exact & top_est) / k, k, int(e.numel()))


def logprob_metric(
    tokens: Int[Tensor, "batch pos"], mask: Bool[Tensor, "batch pos"] | None = None
) -> MetricFn:
    """A differentiable metric: the mean log-probability of the next token ``tokens[:, t + 1]``
    at the positions ``t`` where ``mask`` is True (every position but the last by default; a
    task batch's ``mask`` marks where its rule predicts)."""
    tokens = torch.as_tensor(tokens)
    if tokens.ndim != 2 or tokens.shape[1] < 2:
        raise ValueError(f"tokens must be [batch, pos] with pos >= 2, got {tuple(tokens.shape)}")
    if mask is None:
        mask = torch.ones_like(tokens, dtype=torch.bool)
        mask[:, -1] = False
    if mask.shape != tokens.shape or bool(mask[:, -1].any()) or not bool(mask.any()):
        raise ValueError("mask must be shaped like tokens, False at the last position and True somewhere")

    def metric(logits: Tensor) -> Tensor:
        logp = logits[:, :-1].float().log_softmax(-1)
        target = tokens[:, 1:].to(logits.device)
        picked = logp.gather(-1, target[..., None])[..., 0]
        return picked[mask[:, :-1].to(logits.device)].mean()

    return metric


__all__ = [
    "DIRECTIONS",
    "Agreement",
    "AttributionResult",
    "agreement",
    "attribution_patch",
    "cell_axes",
    "exact_patching_effects",
    "logprob_metric",
    "resolve_hook_names",
]
