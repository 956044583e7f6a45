"""Token embedding, learned positional embedding and unembedding (TransformerLens names)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

from kvshift_lens.components.parameters import normal, zeros
from kvshift_lens.config import KVShiftConfig


class Embed(nn.Module):
    """``W_E [d_vocab, d_model]``: ``embed(tokens) = W_E[tokens]``.

    Args:
        cfg: reads ``d_vocab`` and ``d_model``.
        generator: draws the initial ``W_E`` (None: torch's global RNG).
    """

    def __init__(self, cfg: KVShiftConfig, generator: torch.Generator | None = None):
        super().__init__()
        self.W_E = normal((cfg.d_vocab, cfg.d_model), cfg, generator)

    def forward(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_model"]:
        # F.embedding: the same rows as W_E[tokens], with a dense backward (no index_put_).
        return F.embedding(tokens, self.W_E)


class PosEmbed(nn.Module):
    """``W_pos [n_ctx, d_model]``: the learned embedding of positions ``offset..offset+pos-1``.

    Args:
        cfg: reads ``n_ctx`` and ``d_model``.
        generator: draws the initial ``W_pos`` (None: torch's global RNG).
    """

    def __init__(self, cfg: KVShiftConfig, generator: torch.Generator | None = None):
        super().__init__()
        self.W_pos = normal((cfg.n_ctx, cfg.d_model), cfg, generator)

    def forward(
        self, tokens: Int[Tensor, "batch pos"], offset: int = 0
    ) -> Float[Tensor, "batch pos d_model"]:
        pos = tokens.shape[1]
        return self.W_pos[offset : offset + pos].unsqueeze(0).expand(tokens.shape[0], -1, -1)


class Unembed(nn.Module):
    """``logits = x @ W_U + b_U`` with ``W_U [d_model, d_vocab]``.

    With ``tie_word_embeddings`` the module holds no ``W_U`` parameter: ``W_U`` is ``W_E.T`` of the
    embedding passed in, so the two can never drift apart.

    Args:
        cfg: reads ``d_model``, ``d_vocab`` and ``tie_word_embeddings``.
        embed: the model's token embedding (read when tied).
        generator: draws the initial ``W_U`` when untied (None: torch's global RNG).
    """

    def __init__(self, cfg: KVShiftConfig, embed: Embed, generator: torch.Generator | None = None):
        super().__init__()
        self.tied = cfg.tie_word_embeddings
        self._embed = [embed]  # a list keeps the embedding out of this module's children
        if not self.tied:
            self.W_U = normal((cfg.d_model, cfg.d_vocab), cfg, generator)
        self.b_U = zeros((cfg.d_vocab,), cfg)

    @property
    def W_U(self) -> Float[Tensor, "d_model d_vocab"]:
        """The unembedding: the ``W_U`` parameter, or ``W_E.T`` when tied."""
        if self.tied:
            return self._embed[0].W_E.T
        if "W_U" not in self._parameters:  # while __init__ registers it (nn.Module asks hasattr)
            raise AttributeError("W_U")
        return self._parameters["W_U"]

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_vocab"]:
        return F.linear(x, self.W_U.T, self.b_U)
