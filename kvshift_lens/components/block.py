"""A pre-norm transformer block with TransformerLens' residual hooks.

``resid_pre -> ln1 -> attn -> hook_attn_out -> resid_mid -> ln2 -> mlp -> hook_mlp_out -> resid_post``
(attention-only blocks skip the MLP and have no ``resid_mid``). With ``parallel_attn_mlp`` (GPT-NeoX)
both read ``resid_pre``: ``resid_post = resid_pre + attn(ln1(resid_pre)) + mlp(ln2(resid_pre))``,
and there is no ``resid_mid``.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from kvshift_lens.components.attention import LayerKVCache, make_attention
from kvshift_lens.components.mlp import MLP
from kvshift_lens.components.norm import make_norm
from kvshift_lens.config import KVShiftConfig


class TransformerBlock(nn.Module):
    """One layer: ``ln1``, ``attn``, and unless ``attn_only`` ``ln2`` and ``mlp``, wired as the
    module docstring says, with TransformerLens' residual hooks.

    Args:
        cfg: the model config.
        layer: this block's index.
        generator: draws the initial weights of its parts, in the order they are declared
            (None: torch's global RNG).
    """

    # logit_lens and friends read this: the block's hook_out is one residual stream.
    hook_out_is_single_residual_stream = True

    def __init__(self, cfg: KVShiftConfig, layer: int, generator: torch.Generator | None = None):
        super().__init__()
        self.cfg = cfg
        self.layer = layer
        self.ln1 = make_norm(cfg)
        self.attn = make_attention(cfg, generator)
        if not cfg.attn_only:
            self.ln2 = make_norm(cfg)
            self.mlp = MLP(cfg, generator)
            self.hook_mlp_in = HookPoint()  # [batch, pos, d_model]
            self.hook_mlp_out = HookPoint()  # [batch, pos, d_model]
            if not cfg.parallel_attn_mlp:
                self.hook_resid_mid = HookPoint()  # [batch, pos, d_model]
        self.hook_q_input = HookPoint()  # [batch, pos, head_index, d_model]
        self.hook_k_input = HookPoint()  # [batch, pos, kv_head, d_model]
        self.hook_v_input = HookPoint()  # [batch, pos, kv_head, d_model]
        self.hook_attn_in = HookPoint()  # [batch, pos, head_index, d_model]
        for hp in (self.hook_q_input, self.hook_k_input, self.hook_v_input, self.hook_attn_in):
            hp.pos_dim = 1
        self.hook_attn_out = HookPoint()  # [batch, pos, d_model]
        self.hook_resid_pre = HookPoint()  # [batch, pos, d_model]
        self.hook_resid_post = HookPoint()  # [batch, pos, d_model]

    def forward(
        self,
        resid_pre: Float[Tensor, "batch pos d_model"],
        shortformer_pos_embed: Float[Tensor, "batch pos d_model"] | None = None,
        cache: LayerKVCache | None = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        cfg = self.cfg
        resid_pre = self.hook_resid_pre(resid_pre)
        H, KV = cfg.n_heads, cfg.n_key_value_heads
        if cfg.use_attn_in or cfg.use_split_qkv_input:
            if cfg.use_attn_in:
                attn_in = self.hook_attn_in(_per_head(resid_pre, H))
                q_in, k_in, v_in = attn_in, attn_in[:, :, :: cfg.heads_per_kv], attn_in[
                    :, :, :: cfg.heads_per_kv
                ]
            else:
                q_in = self.hook_q_input(_per_head(resid_pre, H))
                k_in = self.hook_k_input(_per_head(resid_pre, KV))
                v_in = self.hook_v_input(_per_head(resid_pre, KV))
            q_in, k_in, v_in = self.ln1(q_in), self.ln1(k_in), self.ln1(v_in)
            if shortformer_pos_embed is not None:
                q_in = q_in + shortformer_pos_embed[:, :, None]
                k_in = k_in + shortformer_pos_embed[:, :, None]
        else:
            normed = self.ln1(resid_pre)
            q_in = k_in = v_in = normed
            if shortformer_pos_embed is not None:
                q_in = k_in = normed + shortformer_pos_embed
        attn_out = self.hook_attn_out(self.attn(q_in, k_in, v_in, cache=cache))
        if cfg.attn_only:
            return self.hook_resid_post(resid_pre + attn_out)
        if cfg.parallel_attn_mlp:
            mlp_in = self.hook_mlp_in(resid_pre.clone()) if cfg.use_hook_mlp_in else resid_pre
            mlp_out = self.hook_mlp_out(self.mlp(self.ln2(mlp_in)))
            return self.hook_resid_post(resid_pre + attn_out + mlp_out)
        resid_mid = self.hook_resid_mid(resid_pre + attn_out)
        mlp_in = self.hook_mlp_in(resid_mid.clone()) if cfg.use_hook_mlp_in else resid_mid
        mlp_out = self.hook_mlp_out(self.mlp(self.ln2(mlp_in)))
        return self.hook_resid_post(resid_mid + mlp_out)


def _per_head(x: Float[Tensor, "batch pos d_model"], n: int) -> Float[Tensor, "batch pos n d_model"]:
    """One copy of the residual stream per head (a copy, so a hook can edit one head's input)."""
    return x.unsqueeze(2).expand(-1, -1, n, -1).clone()  # [batch, pos, n, d_model]
