"""Probe tests, and the hand-constructed models whose circuits are known by construction.

Every builder returns an eval-mode ``HookedKVShiftTransformer`` (attention only, no normalisation,
one-hot embeddings) whose weights implement a circuit by hand, so a probe's verdict on it can be
checked against the answer rather than against another probe.

Score scale: a matching query-key pair gets an attention score of ``MATCH`` (after the
``1 / sqrt(d_head)`` scaling), every other pair 0, so attention on a match is ``1 - O(n e^-MATCH)``.
Output scale: a head writes ``OUT`` times the one-hot of the token it reads, so its vote beats the
residual stream's copy of the current token (weight 1) at the unembedding.
"""

from __future__ import annotations

import math

import torch

from kvshift_lens import HookedKVShiftTransformer, KVShiftConfig

MATCH = 40.0
OUT = 10.0


def _zero_(model: HookedKVShiftTransformer) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()


def shift_head_model(
    d_vocab: int,
    n_ctx: int,
    key_coeffs: tuple[float, ...] = (0.0, 1.0),
    value_coeffs: tuple[float, ...] = (1.0, 0.0),
    dtype: str = "float32",
) -> HookedKVShiftTransformer:
    """One layer, one head, on one-hot tokens: ``Q_i . K_j = MATCH * [tok_i == tok_j]`` before the
    shift, so with key coefficients ``alpha`` the query matches key j by ``sum_l alpha_l
    [tok_i == tok_{j-l}]``; the OV circuit copies the token it reads (``OUT`` x identity), and
    the unembedding reads token identity.

    With ``alpha = (0, 1)`` and ``beta = (1, 0)`` (the paper's induction point) this is an ideal
    one-layer induction head via the shift; with a window-2 ``alpha = (0, 0, 1), beta = (0, 1, 0)``
    it is an induction head that attends one position later than the usual stripe.
    """
    window = len(key_coeffs) - 1
    assert len(value_coeffs) == window + 1
    cfg = KVShiftConfig(d_model=d_vocab, d_head=d_vocab, n_heads=1, n_layers=1, n_ctx=n_ctx,
                        d_vocab=d_vocab, attn_only=True, positional_embedding_type="none",
                        normalization_type=None, shift_k=True, shift_v=True, shift_window=window,
                        device="cpu", dtype=dtype, use_sdpa=False)
    model = HookedKVShiftTransformer(cfg)
    _zero_(model)
    eye = torch.eye(d_vocab)
    attn = model.blocks[0].attn
    with torch.no_grad():
        model.embed.W_E.copy_(eye)
        model.unembed.W_U.copy_(eye)
        attn.W_Q[0].copy_(eye * MATCH * math.sqrt(d_vocab))
        attn.W_K[0].copy_(eye)
        attn.W_V[0].copy_(eye)
        attn.W_O[0].copy_(eye * OUT)
        attn.shift_k.copy_(torch.tensor([key_coeffs]))
        attn.shift_v.copy_(torch.tensor([value_coeffs]))
    return model.eval()


def two_layer_induction_model(d_vocab: int, n_ctx: int, dtype: str = "float32") -> HookedKVShiftTransformer:
    """Two vanilla layers, one head each: a previous-token head in layer 0 and an induction head
    in layer 1 that finds its prefix by K-composition.

    Residual stream (``d_model = 2 * d_vocab + n_ctx``): ``[token one-hot | position one-hot |
    previous-token one-hot]``. Layer 0: Q reads position i, K reads position j, ``Q_i . K_j =
    MATCH * [j == i - 1]``; OV moves the token subspace into the previous-token subspace. Layer 1:
    Q reads the current token, K reads the previous-token subspace (written by layer 0), so
    ``Q_i . K_j = MATCH * [tok_i == tok_{j-1}]``; OV copies the token (``OUT`` x identity).
    """
    V, P = d_vocab, n_ctx
    d_model = 2 * V + P
    tok, pos, prev = slice(0, V), slice(V, V + P), slice(V + P, 2 * V + P)
    cfg = KVShiftConfig(d_model=d_model, d_head=d_model, n_heads=1, n_layers=2, n_ctx=n_ctx,
                        d_vocab=d_vocab, attn_only=True, positional_embedding_type="standard",
                        normalization_type=None, shift_k=False, shift_v=False, device="cpu",
                        dtype=dtype, use_sdpa=False)
    model = HookedKVShiftTransformer(cfg)
    _zero_(model)
    scale = MATCH * math.sqrt(d_model)
    with torch.no_grad():
        model.embed.W_E[:, tok].copy_(torch.eye(V))
        model.pos_embed.W_pos[:, pos].copy_(torch.eye(P))
        model.unembed.W_U[tok, :].copy_(torch.eye(V))
        a0, a1 = model.blocks[0].attn, model.blocks[1].attn
        # layer 0: query at position i looks for the key of position i - 1
        a0.W_Q[0, pos, pos].copy_(torch.eye(P) * scale)           # q_i = scale * e_i
        a0.W_K[0, pos, pos].copy_(torch.ones(P - 1).diag(1))      # k_j = e_{j+1}
        a0.W_V[0, tok, tok].copy_(torch.eye(V))
        a0.W_O[0, tok, prev].copy_(torch.eye(V))                  # write tok_{i-1} into `prev`
        # layer 1: query = current token, key = previous token (K-composition with layer 0)
        a1.W_Q[0, tok, tok].copy_(torch.eye(V) * scale)
        a1.W_K[0, prev, tok].copy_(torch.eye(V))
        a1.W_V[0, tok, tok].copy_(torch.eye(V))
        a1.W_O[0, tok, tok].copy_(torch.eye(V) * OUT)
    return model.eval()
