"""GPT-NeoX / Pythia (``GPTNeoXForCausalLM``) to :class:`HookedKVShiftTransformer` weights.

The fused ``query_key_value`` projection is ``nn.Linear(d_model, 3 * d_model)`` whose output HF views
as ``[..., head, 3 * d_head]`` and splits into q | k | v *within each head*: its weight rows are laid
out ``[head, 3, d_head]`` (not ``[3, head, d_head]`` as GPT-2's columns are). Partial rotary on the
first ``rotary_pct * d_head`` dims ("rotate half"), LayerNorm, the parallel residual
(``use_parallel_residual``), and an untied unembedding (``embed_out``, named ``lm_head`` since
transformers 5).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from kvshift_lens.config import KVShiftConfig
from kvshift_lens.convert._common import StateDictReader, act_fn, rope_settings, tied_unembed

ARCH = "GPT-NeoX"
MODEL_TYPES = ("gpt_neox",)
PREFIXES = ("gpt_neox.",)
IGNORE_SUFFIXES = (".attention.bias", ".attention.masked_bias", "rotary_emb.inv_freq")


def config_from_hf(c: Any) -> dict[str, Any]:
    theta, partial = rope_settings(ARCH, c)
    d_model, n_heads = c.hidden_size, c.num_attention_heads
    if d_model % n_heads:
        raise ValueError(
            f"{ARCH}: hidden_size={d_model} is not divisible by num_attention_heads={n_heads}")
    d_head = d_model // n_heads
    rotary_dim = int(d_head * partial)
    if rotary_dim < 2 or rotary_dim % 2:
        raise NotImplementedError(
            f"{ARCH}: rotary_pct / partial_rotary_factor={partial} gives {rotary_dim} rotary dims "
            f"of d_head={d_head}; only an even number >= 2 is supported"
        )
    return dict(
        d_model=d_model, d_head=d_head, n_heads=n_heads, n_layers=c.num_hidden_layers,
        n_ctx=c.max_position_embeddings, d_vocab=c.vocab_size, d_mlp=c.intermediate_size,
        act_fn=act_fn(ARCH, "hidden_act", c.hidden_act),
        normalization_type="LN", eps=float(c.layer_norm_eps),
        positional_embedding_type="rotary", rotary_dim=rotary_dim, rotary_base=theta,
        parallel_attn_mlp=bool(c.use_parallel_residual),
        tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
        default_prepend_bos=False,
    )


def weights_from_hf(r: StateDictReader, cfg: KVShiftConfig, c: Any) -> dict[str, Tensor]:
    dm, H, dh, dmlp, V = cfg.d_model, cfg.n_heads, cfg.d_head, cfg.d_mlp, cfg.d_vocab
    bias = bool(getattr(c, "attention_bias", True))
    W_E = r.take("embed_in.weight", (V, dm))
    out = {"embed.W_E": W_E}
    for layer in range(cfg.n_layers):
        p, b = f"layers.{layer}.", f"blocks.{layer}."
        out[b + "ln1.w"] = r.take(p + "input_layernorm.weight", (dm,))
        out[b + "ln1.b"] = r.take(p + "input_layernorm.bias", (dm,))
        qkv = r.take(p + "attention.query_key_value.weight", (3 * dm, dm)).reshape(H, 3, dh, dm)
        for i, name in enumerate("QKV"):
            out[b + f"attn.W_{name}"] = qkv[:, i].transpose(1, 2)  # [H, d_model, d_head]
        if bias:
            qkv_b = r.take(p + "attention.query_key_value.bias", (3 * dm,)).reshape(H, 3, dh)
            for i, name in enumerate("QKV"):
                out[b + f"attn.b_{name}"] = qkv_b[:, i]
        out[b + "attn.W_O"] = r.take(p + "attention.dense.weight", (dm, dm)).T.reshape(H, dh, dm)
        if bias:
            out[b + "attn.b_O"] = r.take(p + "attention.dense.bias", (dm,))
        out[b + "ln2.w"] = r.take(p + "post_attention_layernorm.weight", (dm,))
        out[b + "ln2.b"] = r.take(p + "post_attention_layernorm.bias", (dm,))
        out[b + "mlp.W_in"] = r.take(p + "mlp.dense_h_to_4h.weight", (dmlp, dm)).T
        out[b + "mlp.b_in"] = r.take(p + "mlp.dense_h_to_4h.bias", (dmlp,))
        out[b + "mlp.W_out"] = r.take(p + "mlp.dense_4h_to_h.weight", (dm, dmlp)).T
        out[b + "mlp.b_out"] = r.take(p + "mlp.dense_4h_to_h.bias", (dm,))
    out["ln_final.w"] = r.take("final_layer_norm.weight", (dm,))
    out["ln_final.b"] = r.take("final_layer_norm.bias", (dm,))
    # transformers >= 5 names the head lm_head; older checkpoints and state dicts embed_out.
    head_key = "embed_out.weight" if "embed_out.weight" in r else "lm_head.weight"
    head = tied_unembed(r, head_key, W_E, cfg.tie_word_embeddings, (V, dm))
    if head is not None:
        out["unembed.W_U"] = head.T
    return out
