"""How probes read a model: through the TransformerLens protocol (``cfg``, ``hook_dict``,
``run_with_cache``) plus, when the model has it, the coefficient API ``model.shift_coefficients()``.

Nothing here imports ``kvshift_lens``: a model without ``shift_coefficients`` (a vanilla
TransformerLens-style model) is read as unshifted.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor


def pattern_hook(layer: int) -> str:
    """The full name of layer ``layer``'s attention-pattern hook, ``[batch, head, query_pos, key_pos]``."""
    return f"blocks.{layer}.attn.hook_pattern"


def model_dims(model: Any) -> tuple[int, int]:
    """``(n_layers, n_heads)`` from ``model.cfg``; ValueError (naming the first pattern hook, the
    thing probes need) for an object without a TransformerLens config."""
    cfg = getattr(model, "cfg", None)
    n_layers, n_heads = getattr(cfg, "n_layers", None), getattr(cfg, "n_heads", None)
    if not isinstance(n_layers, int) or not isinstance(n_heads, int):
        raise ValueError(
            f"{type(model).__name__} is not a TransformerLens-style model: it has no cfg with "
            f"n_layers and n_heads, and no hook point {pattern_hook(0)!r}; probes need a "
            "HookedRootModule with HookedTransformer's hook names (TL4_CONTRACT.md)"
        )
    return n_layers, n_heads


def require_hooks(model: Any, names: Sequence[str]) -> None:
    """Raise ValueError naming every hook in ``names`` that ``model`` does not have."""
    hook_dict = getattr(model, "hook_dict", None)
    if not isinstance(hook_dict, dict):
        raise ValueError(
            f"{type(model).__name__} has no TransformerLens hook points (no hook_dict), so it has "
            f"no {names[0]!r}; probes need a HookedRootModule with HookedTransformer's hook names"
        )
    missing = [n for n in names if n not in hook_dict]
    if missing:
        raise ValueError(
            f"{type(model).__name__} lacks the hook(s) {missing} that this probe reads "
            f"(it has {len(hook_dict)} hook points)"
        )


def model_device(model: Any) -> torch.device:
    """Where the model's weights live (``cfg.device`` when the model has no parameters)."""
    params = getattr(model, "parameters", None)
    if callable(params):
        first = next(iter(params()), None)
        if first is not None:
            return first.device
    return torch.device(getattr(getattr(model, "cfg", None), "device", None) or "cpu")


def prepare_tokens(model: Any, tokens: Tensor) -> Int[Tensor, "batch pos"]:
    """``tokens`` as LongTensor ``[batch, pos]`` (a 1-D tensor is one sequence) on the model's
    device."""
    if not isinstance(tokens, Tensor):
        raise TypeError(f"tokens must be a tensor of token ids, got {type(tokens).__name__}")
    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise TypeError(f"tokens must be an integer tensor, got dtype {tokens.dtype}")
    if tokens.ndim == 1:
        tokens = tokens[None]
    if tokens.ndim != 2 or tokens.shape[1] < 2:
        raise ValueError(f"tokens must have shape [batch, pos] with pos >= 2, got {tuple(tokens.shape)}")
    return tokens.to(device=model_device(model), dtype=torch.long)


@torch.no_grad()
def get_patterns(
    model: Any, tokens: Tensor, return_logits: bool = False
) -> Float[Tensor, "layer batch head query_pos key_pos"] | tuple[Tensor, Tensor]:
    """Every layer's attention pattern on ``tokens`` (one forward pass, caching only the patterns).

    Returns:
        ``[layer, batch, head, query_pos, key_pos]`` on the model's device (and the logits
        ``[batch, pos, d_vocab]`` with ``return_logits``).
    """
    n_layers, _ = model_dims(model)
    names = [pattern_hook(layer) for layer in range(n_layers)]
    require_hooks(model, names)
    tokens = prepare_tokens(model, tokens)
    logits, cache = model.run_with_cache(tokens, names_filter=lambda name: name in names)
    patterns = torch.stack([cache[name] for name in names])
    return (patterns, logits) if return_logits else patterns


def head_coefficients(
    model: Any, which: str, keep_precision: bool = False
) -> Float[Tensor, "layer head lag"] | None:
    """A model's shift coefficients for projection ``which`` ("k", "v" or "q"), per *query* head
    (KV-head coefficients repeated under grouped-query attention), detached; on CPU as float32
    unless ``keep_precision`` (then in the model's dtype, on its device).

    Duck-typed: reads ``model.shift_coefficients()`` (an object with ``.values`` or a mapping from
    "k"/"v"/"q" to ``[layer, head, lag]``). Returns None when the model has no such method or does
    not shift ``which``: that projection is unshifted (identity).
    """
    get = getattr(model, "shift_coefficients", None)
    if not callable(get):
        return None
    coeffs = get()
    values = getattr(coeffs, "values", coeffs)
    if callable(values):  # a plain dict's .values method, not a dict attribute
        values = coeffs
    out = values.get(which) if hasattr(values, "get") else None
    if out is None:
        return None
    out = out.detach() if keep_precision else out.detach().float().cpu()
    _, n_heads = model_dims(model)
    if out.ndim != 3:
        raise ValueError(f"shift coefficients {which!r} must be [layer, head, lag], got {tuple(out.shape)}")
    if out.shape[1] != n_heads:
        if out.shape[1] == 0 or n_heads % out.shape[1]:
            raise ValueError(
                f"shift coefficients {which!r} have {out.shape[1]} heads, the model {n_heads}")
        out = out.repeat_interleave(n_heads // out.shape[1], dim=1)
    return out


__all__ = ["get_patterns", "head_coefficients", "model_device", "model_dims", "pattern_hook",
           "prepare_tokens", "require_hooks"]
