"""The MLP: ``W_out act(W_in x + b_in) + b_out``, or gated: ``W_out (act(W_gate x) * (W_in x + b_in))``.

Hooks (TransformerLens): ``hook_pre`` [b, p, d_mlp] is the activation's input (the gate's, when
gated), ``hook_pre_linear`` the linear branch of a gated MLP, ``hook_post`` [b, p, d_mlp] what
``W_out`` reads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from kvshift_lens.config import KVShiftConfig

_ACTS = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}


class MLP(nn.Module):
    def __init__(self, cfg: KVShiftConfig):
        super().__init__()
        self.gated = cfg.gated_mlp
        self.act = _ACTS[cfg.act_fn]
        self.W_in = nn.Parameter(torch.empty(cfg.d_model, cfg.d_mlp, dtype=cfg.dtype))
        self.b_in = nn.Parameter(torch.zeros(cfg.d_mlp, dtype=cfg.dtype))
        if self.gated:
            self.W_gate = nn.Parameter(torch.empty(cfg.d_model, cfg.d_mlp, dtype=cfg.dtype))
            self.hook_pre_linear = HookPoint()  # [batch, pos, d_mlp]
        self.W_out = nn.Parameter(torch.empty(cfg.d_mlp, cfg.d_model, dtype=cfg.dtype))
        self.b_out = nn.Parameter(torch.zeros(cfg.d_model, dtype=cfg.dtype))
        self.hook_pre = HookPoint()  # [batch, pos, d_mlp]
        self.hook_post = HookPoint()  # [batch, pos, d_mlp]

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        linear = torch.addmm(self.b_in, x.reshape(-1, x.shape[-1]), self.W_in).view(
            *x.shape[:-1], -1
        )
        if self.gated:
            pre = self.hook_pre(x @ self.W_gate)
            post = self.hook_post(self.act(pre) * self.hook_pre_linear(linear))
        else:
            post = self.hook_post(self.act(self.hook_pre(linear)))
        return F.linear(post, self.W_out.T, self.b_out)
