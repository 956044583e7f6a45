"""LayerNorm and RMSNorm with TransformerLens' hooks: ``hook_scale [b, p, 1]`` and ``hook_normalized``.

``LN``: ``(x - mean) / sqrt(var + eps) * w + b``. ``RMS``: ``x / sqrt(mean(x^2) + eps) * w``.
``LNPre`` / ``RMSPre`` are the same without ``w`` / ``b`` (a model whose norms are folded).
"""

from __future__ import annotations

import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from kvshift_lens.components.parameters import ones, zeros
from kvshift_lens.config import KVShiftConfig


class Norm(nn.Module):
    """``cfg.normalization_type``'s norm over the last axis (module docstring), with its scale
    ``w [length]`` (LN, RMS; starts at 1) and bias ``b [length]`` (LN; starts at 0).

    When nothing hooks ``hook_scale`` or ``hook_normalized`` it runs the fused
    ``F.layer_norm`` / ``F.rms_norm`` kernels (the same maths); otherwise the explicit steps.

    Args:
        cfg: reads ``normalization_type``, ``eps``, ``d_model``.
        length: the normalised axis' size (default ``d_model``).
    """

    def __init__(self, cfg: KVShiftConfig, length: int | None = None):
        super().__init__()
        kind = cfg.normalization_type
        length = cfg.d_model if length is None else length
        self.center = kind in ("LN", "LNPre")
        self.eps = cfg.eps
        if kind in ("LN", "RMS"):
            self.w = ones((length,), cfg)
        if kind == "LN":
            self.b = zeros((length,), cfg)
        self.hook_scale = HookPoint()  # [batch, pos, 1] (or [batch, pos, head, 1])
        self.hook_normalized = HookPoint()  # [batch, pos, length]

    def forward(self, x: Float[Tensor, "batch pos length"]) -> Float[Tensor, "batch pos length"]:
        s, n = self.hook_scale, self.hook_normalized
        if not (s.fwd_hooks or s.bwd_hooks or n.fwd_hooks or n.bwd_hooks):
            # Nothing observes the intermediate scale: use the fused kernels (same maths).
            w, b = self._parameters.get("w"), self._parameters.get("b")
            if self.center:
                return F.layer_norm(x, x.shape[-1:], w, b, self.eps)
            return F.rms_norm(x, x.shape[-1:], w, self.eps)
        if self.center:
            x = x - x.mean(-1, keepdim=True)
        scale = self.hook_scale((x.pow(2).mean(-1, keepdim=True) + self.eps).sqrt())
        x = x / scale
        if hasattr(self, "w"):
            x = x * self.w
        if hasattr(self, "b"):
            x = x + self.b
        return self.hook_normalized(x)


def make_norm(cfg: KVShiftConfig) -> nn.Module:
    """The configured norm, or ``nn.Identity`` when ``normalization_type`` is None."""
    return nn.Identity() if cfg.normalization_type is None else Norm(cfg)
