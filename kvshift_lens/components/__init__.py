"""The model's parts, one small class per file, with TransformerLens' parameter and hook names.

Each part declares and initialises its own parameters (:mod:`.parameters`) from the config and
the generator passed down to it.
"""

from kvshift_lens.components.attention import Attention, GroupedQueryAttention, make_attention
from kvshift_lens.components.block import TransformerBlock
from kvshift_lens.components.embed import Embed, PosEmbed, Unembed
from kvshift_lens.components.kv_cache import LayerKVCache
from kvshift_lens.components.mlp import MLP
from kvshift_lens.components.norm import make_norm
from kvshift_lens.components.rotary import Rotary

__all__ = ["MLP", "Attention", "Embed", "GroupedQueryAttention", "LayerKVCache", "PosEmbed",
           "Rotary", "TransformerBlock", "Unembed", "make_attention", "make_norm"]
