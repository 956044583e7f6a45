"""Token embedding, learned positional embedding and unembedding (TransformerLens names)."""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from kvshift_lens.config import KVShiftConfig


class Embed(nn.Module):
    """``W_E [d_vocab, d_model]``: ``embed(tokens) = W_E[tokens]``."""

    def __init__(self, cfg: KVShiftConfig):
        super().__init__()
        self.W_E = nn.Parameter(torch.empty(cfg.d_vocab, cfg.d_model, dtype=cfg.dtype))

    def forward(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_model"]:
        return self.W_E[tokens]


class PosEmbed(nn.Module):
    """``W_pos [n_ctx, d_model]``: the learned embedding of positions ``offset..offset+pos-1``."""

    def __init__(self, cfg: KVShiftConfig):
        super().__init__()
        self.W_pos = nn.Parameter(torch.empty(cfg.n_ctx, cfg.d_model, dtype=cfg.dtype))

    def forward(
        self, tokens: Int[Tensor, "batch pos"], offset: int = 0
    ) -> Float[Tensor, "batch pos d_model"]:
        pos = tokens.shape[1]
        return self.W_pos[offset : offset + pos].unsqueeze(0).expand(tokens.shape[0], -1, -1)


class Unembed(nn.Module):
    """``logits = x @ W_U + b_U`` with ``W_U [d_model, d_vocab]``.

    With ``tie_word_embeddings`` the module holds no ``W_U`` parameter: ``W_U`` is ``W_E.T`` of the
    embedding passed in, so the two can never drift apart.
    """

    def __init__(self, cfg: KVShiftConfig, embed: Embed):
        super().__init__()
        self.tied = cfg.tie_word_embeddings
        self._embed = [embed]  # a list keeps the embedding out of this module's children
        if not self.tied:
            self.W_U = nn.Parameter(torch.empty(cfg.d_model, cfg.d_vocab, dtype=cfg.dtype))
        self.b_U = nn.Parameter(torch.zeros(cfg.d_vocab, dtype=cfg.dtype))

    def _w_u(self) -> Float[Tensor, "d_model d_vocab"]:
        params = self.__dict__["_parameters"]
        if "W_U" in params:
            return params["W_U"]
        if self.__dict__.get("tied"):
            return self._embed[0].W_E.T
        raise AttributeError("W_U")

    W_U = property(_w_u)

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_vocab"]:
        return torch.nn.functional.linear(x, self.W_U.T, self.b_U)
