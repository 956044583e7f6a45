"""Folding norms into the weights that read them, exactly, for every shape and under the shift.

What ``model.fold_layer_norm_()`` does, step by step (the three steps of TransformerLens'
``ProcessWeights.process_weights(fold_ln=True, center_writing_weights=True, center_unembed=True,
fold_value_biases=False)``), each written with the axis it works on named, never guessed::

    fold      norm(x) = n(x) * w + b  read by  y = norm(x) @ W + c        (W: [..., d_model, out])
              ->  W' = w[:, None] * W,  c' = c + b @ W,  norm.w = 1, norm.b = 0
              (readers: ln1 -> W_Q, W_K, W_V; ln2 -> W_in (and W_gate); ln_final -> W_U)
    centre    LayerNorm only: n(x) has zero mean over d_model, so the mean over d_model of each
              reading weight (axis -2) is removed; writing weights (W_E, W_pos, W_O, W_out; axis
              -1) and their biases lose their mean too, since every reader of the residual stream
              is a LayerNorm that removes it anyway
    unembed   W_U and b_U lose their mean over d_vocab (axis -1): logits move by one constant per
              position, log-probs not at all

Why not ``ProcessWeights`` itself: TransformerLens 4.3 guesses the orientation of the unembedding
and of the MLP input weight from their shapes (``if W.shape[1] == d_model: scale columns``), so on a
model with ``d_vocab == d_model`` it scales ``W_U`` along the vocabulary axis, and with ``d_mlp ==
d_model`` it scales ``W_in`` along the neuron axis; log-probs change by up to several nats and
nothing complains. It also rounds float64 weights through float32 in ``process_weights`` and
creates a ``b_gate`` the MLP does not have for LayerNorm + gated MLPs. Every step here is one line
with a fixed axis, so square shapes are just shapes.

Exact under the shift: folding changes how Q, K and V are computed from the residual stream, not
the shift applied to them. Value biases are never folded: the bias a shifted value carries is
``(beta1 + beta2) * b_V`` except at position 0, so moving it into ``b_O`` would change the output.

Two norms cannot be folded exactly and are left as they are (a warning names them):
- ``ln1`` with ``shortformer`` positions: the positional embedding is added *after* ln1 and read by
  W_Q and W_K, so scaling W_Q by ln1's weight would scale the positions too;
- ``ln2`` with LayerNorm and a gated MLP whose ``ln2.b`` is not zero: the gate has no bias to
  take ``b @ W_gate``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float
from torch import Tensor

from kvshift_lens.components.embed import Unembed

if TYPE_CHECKING:
    from kvshift_lens.model import HookedKVShiftTransformer

logger = logging.getLogger(__name__)

State = dict[str, Tensor]


def _fold_norm(
    state: State,
    norm: str,
    readers: list[tuple[str, str | None]],
    d_model: int,
    center: bool,
) -> None:
    """Fold the norm ``{norm}.w`` / ``{norm}.b`` into each reader ``(W, bias)`` in place.

    Every reader computes ``norm(x) @ W (+ bias)`` with ``W [..., d_model, out]``: the d_model
    axis is -2 for W_Q/W_K/W_V ``[head, d_model, d_head]``, W_in/W_gate ``[d_model, d_mlp]`` and
    W_U ``[d_model, d_vocab]`` alike. ``center`` removes each W's mean over that axis (exact only
    when the folded norm's output has zero mean: LayerNorm).
    """
    w, b = state.get(f"{norm}.w"), state.get(f"{norm}.b")
    for W_name, bias_name in readers:
        W = state[W_name]
        if W.shape[-2] != d_model:
            raise ValueError(
                f"{W_name} has shape {tuple(W.shape)}; expected d_model={d_model} on axis -2 "
                f"(the axis that reads {norm}'s output)")
        if bias_name is not None and b is not None:
            state[bias_name] = state[bias_name] + b @ W  # [..., out]
        elif _nonzero(b):  # the caller leaves such a norm unfolded
            raise ValueError(f"{W_name} has no bias to take {norm}.b")  # pragma: no cover
        if w is not None:
            W = W * w[:, None]  # scales rows: axis -2 is d_model
        if center:
            W = W - W.mean(-2, keepdim=True)
        state[W_name] = W
    if w is not None:
        state[f"{norm}.w"] = torch.ones_like(w)
    if b is not None:
        state[f"{norm}.b"] = torch.zeros_like(b)


def _center_writer(state: State, W_name: str, bias_name: str | None, d_model: int) -> None:
    """Remove the mean over d_model (axis -1) of a weight that writes to the residual stream."""
    W = state[W_name]
    if W.shape[-1] != d_model:
        raise ValueError(
            f"{W_name} has shape {tuple(W.shape)}; expected d_model={d_model} on axis -1 (the "
            "axis it writes to the residual stream)")
    state[W_name] = W - W.mean(-1, keepdim=True)
    if bias_name is not None:
        state[bias_name] = state[bias_name] - state[bias_name].mean()


def _attn_key(state: State, prefix: str, name: str) -> str:
    """``W_K`` / ``b_K``... or, under grouped-query attention, the stored ``_W_K`` / ``_b_K``."""
    return f"{prefix}{name}" if f"{prefix}{name}" in state else f"{prefix}_{name}"


def _nonzero(t: Float[Tensor, "..."] | None) -> bool:
    return t is not None and bool((t != 0).any())


@torch.no_grad()
def fold_layer_norm(
    model: HookedKVShiftTransformer,
    center_writing_weights: bool = True,
    center_unembed: bool = True,
) -> None:
    """Fold every norm's weights (and LayerNorm biases) into the weights that read it, in place.

    See the module docstring for the steps. Keeps the dtype (no rounding through float32) and the
    log-probs (to float precision), whatever the shapes. A tied unembedding is untied first (the
    fold changes ``W_U`` alone).

    Args:
        model: the model, changed in place.
        center_writing_weights: remove the mean over d_model of W_E, W_pos, W_O, W_out and their
            biases (LayerNorm models only; a no-op for RMSNorm, whose readers do not centre).
        center_unembed: remove the mean over d_vocab of W_U and b_U.
    """
    cfg = model.cfg
    if cfg.tie_word_embeddings:
        W_U, b_U = model.W_U.detach().clone(), model.b_U.detach().clone()
        cfg.tie_word_embeddings = False
        # (Its initial weights are overwritten below: a private generator keeps torch's global
        # RNG untouched.)
        model.unembed = Unembed(cfg, model.embed, torch.Generator()).to(W_U.device)
        model.unembed.W_U.copy_(W_U)
        model.unembed.b_U.copy_(b_U)
        model.setup()
    state: State = {k: v.clone() for k, v in model.state_dict().items()}
    d_model = cfg.d_model
    layer_norm = cfg.normalization_type in ("LN", "LNPre")
    left: list[str] = []  # norms that cannot be folded exactly, with the reason
    if cfg.normalization_type is not None:
        for layer in range(cfg.n_layers):
            p = f"blocks.{layer}."
            if cfg.positional_embedding_type == "shortformer" and (
                    f"{p}ln1.w" in state or f"{p}ln1.b" in state):
                left.append(f"{p}ln1 (shortformer positions are added after it)")
            else:
                readers = [(_attn_key(state, p + "attn.", f"W_{x}"),
                            _attn_key(state, p + "attn.", f"b_{x}")) for x in "QKV"]
                _fold_norm(state, p + "ln1", readers, d_model, center=layer_norm)
            if cfg.attn_only:
                continue
            readers = [(f"{p}mlp.W_in", f"{p}mlp.b_in")]
            if cfg.gated_mlp:
                if _nonzero(state.get(f"{p}ln2.b")):
                    left.append(f"{p}ln2 (the gated MLP has no gate bias to take ln2.b)")
                    continue
                readers.append((f"{p}mlp.W_gate", None))
            _fold_norm(state, p + "ln2", readers, d_model, center=layer_norm)
        _fold_norm(state, "ln_final", [("unembed.W_U", "unembed.b_U")], d_model,
                   center=layer_norm)
    if left:
        logger.warning("fold_layer_norm: left unfolded, since no fold of them is exact: %s",
                       "; ".join(left))
    if center_writing_weights and layer_norm:
        _center_writer(state, "embed.W_E", None, d_model)
        if cfg.positional_embedding_type == "standard":
            # (Shortformer positions feed queries and keys only, never the residual stream.)
            _center_writer(state, "pos_embed.W_pos", None, d_model)
        for layer in range(cfg.n_layers):
            p = f"blocks.{layer}."
            _center_writer(state, p + "attn.W_O", p + "attn.b_O", d_model)
            if not cfg.attn_only:
                _center_writer(state, p + "mlp.W_out", p + "mlp.b_out", d_model)
    if center_unembed:
        W_U = state["unembed.W_U"]  # [d_model, d_vocab]
        state["unembed.W_U"] = W_U - W_U.mean(-1, keepdim=True)
        state["unembed.b_U"] = state["unembed.b_U"] - state["unembed.b_U"].mean()
    model.load_state_dict(state)
