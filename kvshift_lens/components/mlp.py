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

from kvshift_lens.components.parameters import normal, zeros
from kvshift_lens.config import KVShiftConfig

_ACTS = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}


class MLP(nn.Module):
    """The feed-forward layer, plain or gated (module docstring), with TransformerLens' names:
    ``W_in`` / ``W_gate [d_model, d_mlp]``, ``b_in [d_mlp]``, ``W_out [d_mlp, d_model]``,
    ``b_out [d_model]``.

    Args:
        cfg: reads ``d_model``, ``d_mlp``, ``act_fn``, ``gated_mlp``.
        generator: draws the initial weights (None: torch's global RNG).
    """

    def __init__(self, cfg: KVShiftConfig, generator: torch.Generator | None = None):
        super().__init__()
        self.gated = cfg.gated_mlp
        self.act = _ACTS[cfg.act_fn]
        self.W_in = normal((cfg.d_model, cfg.d_mlp), cfg, generator)
        self.b_in = zeros((cfg.d_mlp,), cfg)
        if self.gated:
            self.W_gate = normal((cfg.d_model, cfg.d_mlp), cfg, generator)
            self.hook_pre_linear = HookPoint()  # [batch, pos, d_mlp]
        self.W_out = normal((cfg.d_mlp, cfg.d_model), cfg, generator)
        self.b_out = zeros((cfg.d_model,), cfg)
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
