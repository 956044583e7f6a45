"""Llama-family (``LlamaForCausalLM``, and ``MistralForCausalLM`` without a sliding window) to
:class:`HookedKVShiftTransformer` weights.

RMSNorm, SwiGLU (``down(silu(gate(x)) * up(x))`` = our gated MLP with ``W_gate = gate.T`` and
``W_in = up.T``), grouped-query attention (query head h reads KV head ``h // (H / KV)``, as our
``repeat_interleave`` does) and RoPE. HF stores Llama's q/k projections already permuted for the
"rotate half" convention (the conversion script from Meta's interleaved layout permutes them), which
is what our rotary uses, so the rows map straight onto heads with no permutation.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from kvshift_lens.config import KVShiftConfig
from kvshift_lens.convert._common import (
    StateDictReader,
    act_fn,
    require,
    rope_settings,
    tied_unembed,
)

ARCH = "Llama"
MODEL_TYPES = ("llama", "mistral")
PREFIXES = ("model.",)
IGNORE_SUFFIXES = ("rotary_emb.inv_freq",)


def _arch(c: Any) -> str:
    return {"mistral": "Mistral"}.get(getattr(c, "model_type", ""), ARCH)


def config_from_hf(c: Any) -> dict[str, Any]:
    arch = _arch(c)
    require(arch, c, "mlp_bias", False, "the gated MLP has no bias on W_gate or W_out")
    require(arch, c, "sliding_window", None, "attention is full causal attention")
    require(arch, c, "use_sliding_window", False, "attention is full causal attention")
    theta, partial = rope_settings(arch, c)
    if partial != 1.0:
        raise NotImplementedError(
            f"{arch}: partial_rotary_factor={partial} is not supported for this architecture")
    d_model, n_heads = c.hidden_size, c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or d_model // n_heads
    if head_dim * n_heads != d_model:
        raise NotImplementedError(
            f"{arch}: head_dim={head_dim} with num_attention_heads={n_heads} does not multiply to "
            f"hidden_size={d_model}; the model needs n_heads * d_head == d_model"
        )
    return dict(
        d_model=d_model, d_head=head_dim, n_heads=n_heads,
        n_key_value_heads=getattr(c, "num_key_value_heads", None) or n_heads,
        n_layers=c.num_hidden_layers, n_ctx=c.max_position_embeddings, d_vocab=c.vocab_size,
        d_mlp=c.intermediate_size, gated_mlp=True,
        act_fn=act_fn(arch, "hidden_act", c.hidden_act),
        normalization_type="RMS", eps=float(c.rms_norm_eps),
        positional_embedding_type="rotary", rotary_dim=head_dim, rotary_base=theta,
        tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
        default_prepend_bos=True,
    )


def weights_from_hf(r: StateDictReader, cfg: KVShiftConfig, c: Any) -> dict[str, Tensor]:
    dm, H, KV, dh = cfg.d_model, cfg.n_heads, cfg.n_key_value_heads, cfg.d_head
    dmlp, V = cfg.d_mlp, cfg.d_vocab
    bias = bool(getattr(c, "attention_bias", False))
    kv = "_" if KV != H else ""
    W_E = r.take("embed_tokens.weight", (V, dm))
    out = {"embed.W_E": W_E}
    for layer in range(cfg.n_layers):
        p, b = f"layers.{layer}.", f"blocks.{layer}."
        out[b + "ln1.w"] = r.take(p + "input_layernorm.weight", (dm,))
        for name, proj, n in (("W_Q", "q_proj", H), (f"{kv}W_K", "k_proj", KV),
                              (f"{kv}W_V", "v_proj", KV)):
            # nn.Linear weight [n * d_head, d_model] -> [n, d_model, d_head]
            w = r.take(p + f"self_attn.{proj}.weight", (n * dh, dm))
            out[b + "attn." + name] = w.reshape(n, dh, dm).transpose(1, 2)
            if bias:
                out[b + "attn." + name.replace("W_", "b_")] = r.take(
                    p + f"self_attn.{proj}.bias", (n * dh,)).reshape(n, dh)
        out[b + "attn.W_O"] = r.take(p + "self_attn.o_proj.weight", (dm, H * dh)).T.reshape(H, dh, dm)
        if bias:
            out[b + "attn.b_O"] = r.take(p + "self_attn.o_proj.bias", (dm,))
        out[b + "ln2.w"] = r.take(p + "post_attention_layernorm.weight", (dm,))
        out[b + "mlp.W_gate"] = r.take(p + "mlp.gate_proj.weight", (dmlp, dm)).T
        out[b + "mlp.W_in"] = r.take(p + "mlp.up_proj.weight", (dmlp, dm)).T
        out[b + "mlp.W_out"] = r.take(p + "mlp.down_proj.weight", (dm, dmlp)).T
    out["ln_final.w"] = r.take("norm.weight", (dm,))
    head = tied_unembed(r, "lm_head.weight", W_E, cfg.tie_word_embeddings, (V, dm))
    if head is not None:
        out["unembed.W_U"] = head.T
    return out
