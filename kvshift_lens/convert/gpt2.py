"""GPT-2 (``GPT2LMHeadModel`` / ``GPT2Model``) to :class:`HookedKVShiftTransformer` weights.

GPT-2's ``Conv1D`` stores weights ``[in, out]`` (``y = x @ W + b``). ``c_attn`` is ``[d_model,
3 * d_model]`` with columns ``q | k | v``, each ``[head, d_head]``; ``c_proj`` rows are
``[head, d_head]``. LayerNorm, learned positions, ``gelu_new``, unembedding tied to ``wte``.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from kvshift_lens.config import KVShiftConfig
from kvshift_lens.convert._common import StateDictReader, act_fn, require, tied_unembed

ARCH = "GPT-2"
MODEL_TYPES = ("gpt2",)
PREFIXES = ("transformer.",)
# Causal-mask buffers of older transformers versions, not weights.
IGNORE_SUFFIXES = (".attn.bias", ".attn.masked_bias")


def config_from_hf(c: Any) -> dict[str, Any]:
    require(ARCH, c, "add_cross_attention", False, "a decoder-only model has no cross-attention")
    require(ARCH, c, "scale_attn_by_inverse_layer_idx", False,
            "attention scores are scaled by 1/sqrt(d_head) only")
    require(ARCH, c, "scale_attn_weights", True, "attention scores are always scaled by "
            "1/sqrt(d_head)")
    d_model, n_heads = c.n_embd, c.n_head
    if d_model % n_heads:
        raise ValueError(f"{ARCH}: n_embd={d_model} is not divisible by n_head={n_heads}")
    return dict(
        d_model=d_model, d_head=d_model // n_heads, n_heads=n_heads, n_layers=c.n_layer,
        n_ctx=c.n_positions, d_vocab=c.vocab_size, d_mlp=c.n_inner or 4 * d_model,
        act_fn=act_fn(ARCH, "activation_function", c.activation_function),
        normalization_type="LN", positional_embedding_type="standard",
        eps=float(c.layer_norm_epsilon),
        tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", True)),
        default_prepend_bos=False,
    )


def weights_from_hf(r: StateDictReader, cfg: KVShiftConfig, c: Any) -> dict[str, Tensor]:
    dm, H, dh, dmlp, V = cfg.d_model, cfg.n_heads, cfg.d_head, cfg.d_mlp, cfg.d_vocab
    W_E = r.take("wte.weight", (V, dm))
    out = {"embed.W_E": W_E, "pos_embed.W_pos": r.take("wpe.weight", (cfg.n_ctx, dm))}
    for layer in range(cfg.n_layers):
        p, b = f"h.{layer}.", f"blocks.{layer}."
        out[b + "ln1.w"] = r.take(p + "ln_1.weight", (dm,))
        out[b + "ln1.b"] = r.take(p + "ln_1.bias", (dm,))
        w = r.take(p + "attn.c_attn.weight", (dm, 3 * dm))
        bias = r.take(p + "attn.c_attn.bias", (3 * dm,))
        for i, name in enumerate("QKV"):
            cols = slice(i * dm, (i + 1) * dm)
            out[b + f"attn.W_{name}"] = w[:, cols].reshape(dm, H, dh).permute(1, 0, 2)
            out[b + f"attn.b_{name}"] = bias[cols].reshape(H, dh)
        out[b + "attn.W_O"] = r.take(p + "attn.c_proj.weight", (dm, dm)).reshape(H, dh, dm)
        out[b + "attn.b_O"] = r.take(p + "attn.c_proj.bias", (dm,))
        out[b + "ln2.w"] = r.take(p + "ln_2.weight", (dm,))
        out[b + "ln2.b"] = r.take(p + "ln_2.bias", (dm,))
        out[b + "mlp.W_in"] = r.take(p + "mlp.c_fc.weight", (dm, dmlp))
        out[b + "mlp.b_in"] = r.take(p + "mlp.c_fc.bias", (dmlp,))
        out[b + "mlp.W_out"] = r.take(p + "mlp.c_proj.weight", (dmlp, dm))
        out[b + "mlp.b_out"] = r.take(p + "mlp.c_proj.bias", (dm,))
    out["ln_final.w"] = r.take("ln_f.weight", (dm,))
    out["ln_final.b"] = r.take("ln_f.bias", (dm,))
    head = tied_unembed(r, "lm_head.weight", W_E, cfg.tie_word_embeddings, (V, dm))
    if head is not None:
        out["unembed.W_U"] = head.T
    return out
