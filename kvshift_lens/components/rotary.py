"""Rotary position embedding (GPT-NeoX / Llama "rotate half") on the first ``rotary_dim`` dims.

For a position ``t`` and the pair of dims ``(i, i + rotary_dim / 2)``, with
``theta_i = t * rotary_base ** (-2 i / rotary_dim)``::

    x'_i             = x_i cos(theta_i) - x_{i + half} sin(theta_i)
    x'_{i + half}    = x_{i + half} cos(theta_i) + x_i sin(theta_i)

The dims from ``rotary_dim`` to ``d_head`` pass through unchanged.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor, nn

from kvshift_lens.config import KVShiftConfig


class Rotary(nn.Module):
    """Rotates queries or keys by their absolute position (``offset`` + index in this call).

    Args:
        cfg: reads ``rotary_dim`` and ``rotary_base``.
    """

    def __init__(self, cfg: KVShiftConfig):
        super().__init__()
        self.dim = cfg.rotary_dim
        inv_freq = 1.0 / (cfg.rotary_base ** (torch.arange(0, self.dim, 2).double() / self.dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(
        self, x: Float[Tensor, "batch pos head d_head"], offset: int
    ) -> Float[Tensor, "batch pos head d_head"]:
        pos = torch.arange(offset, offset + x.shape[1], device=x.device, dtype=torch.float64)
        freqs = torch.outer(pos, self.inv_freq.to(x.device))  # [pos, rotary_dim / 2]
        emb = torch.cat([freqs, freqs], dim=-1)[None, :, None, :]  # [1, pos, 1, rotary_dim]
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        rot, rest = x[..., : self.dim], x[..., self.dim :]
        half = self.dim // 2
        rotated_half = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
        out = rot * cos + rotated_half * sin
        return out if rest.shape[-1] == 0 else torch.cat([out, rest], dim=-1)
