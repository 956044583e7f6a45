"""Small builders shared by the tests."""

from __future__ import annotations

import torch

from kvshift_lens import HookedKVShiftTransformer, KVShiftConfig
from kvshift_lens.shift import is_shift_parameter

ARCHS = {
    # name: config overrides
    "attn_only": dict(attn_only=True),
    "gelu": dict(act_fn="gelu"),
    "relu": dict(act_fn="relu"),
    "swiglu": dict(gated_mlp=True, act_fn="silu"),
}


def tiny_config(**overrides) -> KVShiftConfig:
    base = dict(d_model=16, d_head=4, n_layers=2, n_ctx=12, d_vocab=23, d_mlp=24, device="cpu")
    base.update(overrides)
    return KVShiftConfig(**base)


def randomize(model: HookedKVShiftTransformer, seed: int = 0, scale: float = 0.3) -> None:
    """Give every parameter (biases, norm weights and shift coefficients included) random values,
    so no term of the forward pass can hide behind a zero or a one."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "w":
                p.copy_(1 + 0.2 * noise)
            elif is_shift_parameter(name):
                p.copy_(0.5 + 0.5 * noise)
            else:
                p.copy_(scale * noise)
    model.constrain_shift_()


def build(seed: int = 0, randomize_weights: bool = True, **overrides) -> HookedKVShiftTransformer:
    g = torch.Generator().manual_seed(seed)
    model = HookedKVShiftTransformer(tiny_config(**overrides), generator=g)
    if randomize_weights:
        randomize(model, seed)
    return model.eval()
