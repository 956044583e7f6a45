"""What a TransformerLens (HookedTransformer) user brings along: short hook names, state dicts in
HookedTransformer's format, and the factored-matrix refactoring, made exact under the shift.

- :func:`get_act_name`: TransformerLens' ``utilities.get_act_name`` that also knows the shift's
  hooks (``"k_shifted"``, ``"v_shifted"``, ``"q_shifted"``, ``"shift_k"``... live in ``attn``).
- :func:`hooked_transformer_state_dict`: a HookedTransformer state dict (its ``mask`` / ``IGNORE``
  / rotary buffers, no shift coefficients) as this model's state dict.
- :func:`refactor_factored_attn_matrices`: TransformerLens' refactoring of ``W_Q W_K^T`` and
  ``W_V W_O`` into their SVD bases, keeping every logit of a KV-shift model.

Why TransformerLens' refactoring is not reused as it is: it moves ``b_V`` into ``b_O``, which is
exact only when every attention pattern row sums to one over *values that all carry b_V*. Under the
shift the value at key position s is ``sum_l beta_l V_{s-l}``, whose bias is ``(sum_l beta_l) b_V``
except near the start of the sequence (``V_{-1} = 0`` carries no bias), so the folded model
computes different numbers. Here ``b_V`` stays where it is, re-expressed in the new basis.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens.utilities import get_act_name as tl_get_act_name

if TYPE_CHECKING:
    from kvshift_lens.config import KVShiftConfig

State = dict[str, Tensor]

#: Short names of the attention hooks the shift adds (``blocks.{l}.attn.hook_<name>``).
SHIFT_ACT_NAMES = ("q_shifted", "k_shifted", "v_shifted", "shift_q", "shift_k", "shift_v")

#: The non-persistent-in-spirit buffers HookedTransformer's attention keeps in its state dict.
_TL_ATTN_BUFFERS = ("mask", "IGNORE", "rotary_sin", "rotary_cos")


def get_act_name(name: str, layer: int | str | None = None, layer_type: str | None = None) -> str:
    """TransformerLens' ``get_act_name``, knowing the shift's hooks too.

    ``get_act_name("k_shifted", 0) == "blocks.0.attn.hook_k_shifted"``,
    ``get_act_name("shift_v", 1) == "blocks.1.attn.hook_shift_v"``; every other name as
    ``transformer_lens.utilities.get_act_name``.

    Args:
        name: a short name (``"k_shifted"``, ``"pattern"``, ``"resid_pre"``...), a short name with
            its layer (``"k_shifted3"``), or a full hook name (returned unchanged).
        layer: the block index.
        layer_type: which sub-module (``"attn"``, ``"mlp"``, ``"ln1"``...), as in TransformerLens.

    Returns:
        The full hook name.
    """
    if layer is None and layer_type is None:
        match = re.fullmatch(r"((?:[qkv]_shifted)|(?:shift_[qkv]))(\d+)", name)
        if match is not None:
            name, layer = match.group(1), int(match.group(2))
    if name in SHIFT_ACT_NAMES and layer_type in (None, "a", "attn", "attention"):
        return tl_get_act_name(name, layer, "attn")
    return tl_get_act_name(name, layer, layer_type)


# ------------------------------------------------------------------ HookedTransformer state dicts
def hooked_transformer_state_dict(
    state_dict: State,
    cfg: KVShiftConfig,
    own_keys: list[str],
) -> tuple[State, list[str]]:
    """Map a HookedTransformer-format state dict onto this model's keys.

    Drops exactly HookedTransformer's attention buffers (``blocks.{l}.attn.mask``, ``IGNORE``,
    ``rotary_sin``, ``rotary_cos``), after checking the mask is causal, and reports which of the
    model's keys are left to fill: the shift coefficients, and nothing else.

    Args:
        state_dict: the HookedTransformer state dict.
        cfg: the model's config.
        own_keys: the keys of the model's own state dict.

    Returns:
        ``(state, missing)``: the state dict without the buffers, and the shift-coefficient keys
        it lacks.

    Raises:
        ValueError: a bidirectional mask, keys the model does not have, or missing keys other
            than shift coefficients (each named).
    """
    state: State = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if (len(parts) == 4 and parts[0] == "blocks" and parts[2] == "attn"
                and parts[3] in _TL_ATTN_BUFFERS):
            if parts[3] == "mask" and not torch.equal(value.bool(), value.bool().tril()):
                raise ValueError(
                    f"{key} is not a causal (lower-triangular) mask: the state dict comes from a "
                    "bidirectional HookedTransformer, and a KV-shift model is a causal decoder")
            continue
        state[key] = value
    own = set(own_keys)
    unexpected = sorted(set(state) - own)
    missing = sorted(own - set(state))
    not_shift = [k for k in missing if not k.rsplit(".", 1)[-1].startswith("shift_")]
    if unexpected or not_shift:
        raise ValueError(
            "the state dict does not match this model beyond HookedTransformer's attention buffers "
            f"and the shift coefficients: unexpected keys {unexpected}, missing keys {not_shift} "
            f"(config: n_layers={cfg.n_layers}, normalization_type={cfg.normalization_type!r}, "
            f"positional_embedding_type={cfg.positional_embedding_type!r}, "
            f"attn_only={cfg.attn_only}, gated_mlp={cfg.gated_mlp}, "
            f"n_key_value_heads={cfg.n_key_value_heads}, "
            f"tie_word_embeddings={cfg.tie_word_embeddings})")
    return state, missing


# ------------------------------------------------------------------ refactoring
def _even_factors(
    left: Float[Tensor, "head rows d_head"], right: Float[Tensor, "head d_head cols"]
) -> tuple[Float[Tensor, "head rows d_head"], Float[Tensor, "head d_head cols"]]:
    """``(U sqrt(S), sqrt(S) V^T)`` of the SVD of ``left @ right``, computed in float64 without
    forming the product (TransformerLens' ``FactoredMatrix.make_even``)."""
    from transformer_lens.FactoredMatrix import FactoredMatrix

    U, S, Vh = FactoredMatrix(left.double(), right.double()).svd()  # Vh: [head, cols, d_head]
    root = S.sqrt()  # [head, d_head]
    return U * root[..., None, :], root[..., :, None] * Vh.transpose(-1, -2)


def check_refactorable(cfg: KVShiftConfig) -> None:
    """Raise ValueError unless :func:`refactor_factored_attn_matrices` can refactor this model
    exactly (no rotary positions, no grouped-query attention)."""
    if cfg.positional_embedding_type == "rotary":
        raise ValueError(
            "refactor_factored_attn_matrices cannot refactor the QK circuit of a rotary model: "
            "W_Q W_K^T depends on the positions of the query and the key")
    if cfg.n_key_value_heads != cfg.n_heads:
        raise ValueError(
            f"refactor_factored_attn_matrices does not support grouped-query attention "
            f"(n_key_value_heads={cfg.n_key_value_heads} < n_heads={cfg.n_heads}): the query heads "
            "of a group share one key and value head, so no single basis per head keeps them all")


@torch.no_grad()
def refactor_factored_attn_matrices(state_dict: State, cfg: KVShiftConfig) -> State:
    """Re-express every head's Q/K and V/O weights in the SVD basis of ``W_Q W_K^T`` and
    ``W_V W_O``, keeping the model's outputs exact under the shift.

    QK: the augmented ``[W_Q; b_Q] [W_K; b_K]^T`` (``[d_model + 1, d_model + 1]``) is factored
    evenly, as TransformerLens does, so the bilinear form ``Q(x) . K(y)`` is kept for every pair of
    residual vectors, biases included. The shift forms ``K'_s = sum_l a_l K_{s-l}`` (and likewise
    Q'), so each shifted score is a sum of such bilinear forms with the same coefficients and stays
    exact; positions before the start contribute zero in both bases.

    OV: the augmented ``[W_V; b_V] W_O`` is factored the same way, so ``W_V' W_O' = W_V W_O`` and
    ``b_V' W_O' = b_V W_O``: the value bias keeps its exact contribution (``b_V`` is not folded
    into ``b_O``; see the module docstring).

    Args:
        state_dict: the model's state dict (not modified).
        cfg: its config.

    Returns:
        A new state dict, in the state dict's dtype.

    Raises:
        ValueError: rotary models (the QK product depends on the positions) and grouped-query
            attention (query heads share a key head, so no per-head basis keeps them all).
    """
    check_refactorable(cfg)
    state = dict(state_dict)
    for layer in range(cfg.n_layers):
        p = f"blocks.{layer}.attn."
        dtype = state[p + "W_Q"].dtype

        def augmented(W: Tensor, b: Tensor) -> Tensor:
            return torch.cat([W, b[:, None, :]], dim=1).double()  # [head, d_model + 1, d_head]

        A, B = _even_factors(augmented(state[p + "W_Q"], state[p + "b_Q"]),
                             augmented(state[p + "W_K"], state[p + "b_K"]).transpose(-1, -2))
        K_aug = B.transpose(-1, -2)  # [head, d_model + 1, d_head]
        state[p + "W_Q"], state[p + "b_Q"] = A[:, :-1].to(dtype), A[:, -1].to(dtype)
        state[p + "W_K"], state[p + "b_K"] = K_aug[:, :-1].to(dtype), K_aug[:, -1].to(dtype)

        V_aug, W_O = _even_factors(augmented(state[p + "W_V"], state[p + "b_V"]),
                                   state[p + "W_O"].double())
        state[p + "W_V"], state[p + "b_V"] = V_aug[:, :-1].to(dtype), V_aug[:, -1].to(dtype)
        state[p + "W_O"] = W_O.to(dtype)  # [head, d_head, d_model]
    return state
