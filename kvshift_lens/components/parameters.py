"""How every parameter starts: each component declares its parameters with these, in the order
it registers them, so one generator passed down the model draws the weights in that order.

Weight matrices ~ N(0, ``init_range``), drawn in float32 from ``generator`` (torch's global RNG
when it is None) and then cast to ``cfg.dtype``; biases 0; norm scales 1.
"""

from __future__ import annotations

import torch
from torch import nn

from kvshift_lens.config import KVShiftConfig


def normal(shape: tuple[int, ...], cfg: KVShiftConfig,
           generator: torch.Generator | None) -> nn.Parameter:
    """A weight matrix: N(0, ``cfg.init_range``) entries."""
    return nn.Parameter((torch.randn(shape, generator=generator) * cfg.init_range).to(cfg.dtype))


def zeros(shape: tuple[int, ...], cfg: KVShiftConfig) -> nn.Parameter:
    """A bias."""
    return nn.Parameter(torch.zeros(shape, dtype=cfg.dtype))


def ones(shape: tuple[int, ...], cfg: KVShiftConfig) -> nn.Parameter:
    """A norm's scale."""
    return nn.Parameter(torch.ones(shape, dtype=cfg.dtype))
