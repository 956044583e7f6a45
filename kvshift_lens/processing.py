"""Weight processing through TransformerLens' ``ProcessWeights``, made safe for the shift."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from transformer_lens.weight_processing import ProcessWeights

from kvshift_lens.components.embed import Unembed

if TYPE_CHECKING:
    from kvshift_lens.model import HookedKVShiftTransformer


@torch.no_grad()
def fold_layer_norm(
    model: HookedKVShiftTransformer,
    center_writing_weights: bool = True,
    center_unembed: bool = True,
) -> None:
    """Fold every norm's weights (and LayerNorm biases) into the weights that read it, in place.

    Exact under the shift: folding changes how K and V are computed from the residual stream, not
    the shift applied to them. Value biases are not folded (``fold_value_biases=False``): the bias
    a shifted value carries is ``(beta1 + beta2) * b_V`` except at position 0, so moving it into
    ``b_O`` would change the output. Centring the unembedding changes logits by a constant per
    position (log-probs are unchanged).
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
    state = dict(model.state_dict())
    W_pos = state.get("pos_embed.W_pos")
    # The steps of ProcessWeights.process_weights(fold_value_biases=False), called one by one:
    # process_weights itself rounds float64 weights through float32 (TransformerLens 4.3).
    layer_norm = cfg.normalization_type in ("LN", "LNPre")
    if cfg.normalization_type is not None:
        state = ProcessWeights.fold_layer_norm(state, cfg, fold_biases=layer_norm,
                                               center_weights=layer_norm)
    if center_writing_weights and layer_norm and not cfg.final_rms:
        state = ProcessWeights.center_writing_weights(state, cfg)
    if center_unembed:
        state = ProcessWeights.center_unembed(state, cfg=cfg)
    processed = state
    if cfg.positional_embedding_type == "shortformer" and W_pos is not None:
        # Shortformer positions feed queries and keys only, never the residual stream.
        processed["pos_embed.W_pos"] = W_pos
    model.load_state_dict(processed)
