"""The model's parts, one small class per file, with TransformerLens' parameter and hook names."""

from kvshift_lens.components.attention import Attention
from kvshift_lens.components.block import TransformerBlock
from kvshift_lens.components.embed import Embed, PosEmbed, Unembed
from kvshift_lens.components.mlp import MLP
from kvshift_lens.components.norm import make_norm

__all__ = ["Attention", "Embed", "MLP", "PosEmbed", "TransformerBlock", "Unembed", "make_norm"]
