"""Q-, K- and V-composition scores between heads of different layers (Elhage et al. 2021), from
the weights, with a random-matrix baseline.

For a head ``h1`` in an earlier layer and ``h2`` in a later one (TransformerLens' row-vector
convention, ``x @ W``)::

    W_OV(h1) = W_V(h1) @ W_O(h1)                 [d_model, d_model]: what h1 reads -> writes
    W_QK(h2) = W_Q(h2) @ W_K(h2).T               [d_model, d_model]: score = x_q W_QK x_k^T
    score(A, B) = ||A @ B||_F / (||A||_F ||B||_F)

    Q-composition: score(W_OV(h1), W_QK(h2))       h1's output feeds h2's queries
    K-composition: score(W_OV(h1), W_QK(h2).T)     h1's output feeds h2's keys
    V-composition: score(W_OV(h1), W_OV(h2))       h1's output feeds h2's values

computed by ``transformer_lens.utilities.composition_scores`` on ``FactoredMatrix`` objects (the
same construction as ``TransformerBridge.all_composition_scores``), so the ``d_model x d_model``
products are never materialised. The score is 1 only when both matrices have rank 1 and ``h2``
reads exactly the direction ``h1`` writes; for two equal rank-r orthogonal projections it is
``1 / sqrt(r)``. Scores of unrelated heads are not 0: :func:`random_composition_baseline` gives their
mean and spread for Gaussian matrices of the same shapes (the score is scale-free, so the weights'
scale does not matter).

**The shift path is invisible here.** A KV-shifted head reads the previous token through
``K'_t = a1 K_t + a2 K_{t-1}`` inside one layer: no weight matrix of an earlier head is involved,
so weight-based composition (which only sees W_Q, W_K, W_V, W_O across layers) says nothing about
it, and a one-layer KV-shift model has no pairs at all. Between layers the plain score is
lag-blind: a high K-composition of ``h1 -> h2`` says h2's keys read what h1 writes, not that a
shifted h2 reads it *one position back* (an induction head, where the plain reading suggests a
head matching its own token). Use the shift-aware forms in :mod:`probes.circuits`:
``lagged_composition_scores`` (these scores split by the earlier head's value lag and the later
head's key / value lag), ``lagged_qk_circuit`` / ``lagged_ov_circuit`` / ``full_qk_circuit`` /
``full_ov_circuit`` (one circuit per lag) and ``decompose_attn_scores`` (per-component, per-lag
terms that sum to ``hook_attn_scores``). Measure the shift path causally with
``probes.ablation.remove_key_shift`` / ``remove_value_shift`` and ``probes.patching`` on
``hook_shift_k`` / ``hook_k_shifted``. The scores also ignore LayerNorm scales between layers;
fold LayerNorm into the weights first (``model.fold_layer_norm_()`` on a copy) for weights that
read what the head reads. With rotary positions, ``W_QK`` leaves out the position-dependent
rotation between query and key; K-composition still says which residual subspace a head's keys
read.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens.FactoredMatrix import FactoredMatrix
from transformer_lens.utilities import composition_scores as tl_composition_scores

MODES = ("Q", "K", "V")


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} must be one of {MODES}")
    return mode


def _left_right(
    W_Q: Tensor, W_K: Tensor, W_V: Tensor, W_O: Tensor, mode: str
) -> tuple[FactoredMatrix, FactoredMatrix]:
    left = FactoredMatrix(W_V, W_O)
    if mode == "V":
        return left, left
    qk = FactoredMatrix(W_Q, W_K.transpose(-2, -1))
    return left, (qk if mode == "Q" else qk.T)


def composition_scores_from_weights(
    W_Q: Float[Tensor, "layer head d_model d_head"],
    W_K: Float[Tensor, "layer head d_model d_head"],
    W_V: Float[Tensor, "layer head d_model d_head"],
    W_O: Float[Tensor, "layer head d_head d_model"],
    mode: str = "K",
) -> Float[Tensor, "layer1 head1 layer2 head2"]:
    """``scores[l1, h1, l2, h2]``: ``mode``-composition of head ``(l1, h1)`` into the later head
    ``(l2, h2)``; 0 wherever ``l1 >= l2`` (no path). Weights are stacked per layer and head as
    TransformerLens stores them (K/V per query head under grouped-query attention).

    Weights only: for KV-shifted heads the score does not say at which position offset the later
    head reads (module docstring); ``probes.circuits.lagged_composition_scores`` does."""
    _check_mode(mode)
    shapes = [tuple(w.shape) for w in (W_Q, W_K, W_V, W_O)]
    if any(len(s) != 4 for s in shapes) or not (shapes[0] == shapes[1] == shapes[2]) or \
            shapes[3] != (*shapes[0][:2], shapes[0][3], shapes[0][2]):
        raise ValueError(
            "expected W_Q, W_K, W_V [layer, head, d_model, d_head] and W_O [layer, head, d_head, "
            f"d_model]; got {shapes}")
    left, right = _left_right(W_Q.detach(), W_K.detach(), W_V.detach(), W_O.detach(), mode)
    scores = tl_composition_scores(left, right, broadcast_dims=True)  # [l1, h1, l2, h2]
    n_layers = W_Q.shape[0]
    idx = torch.arange(n_layers, device=scores.device)
    later = idx[:, None, None, None] < idx[None, None, :, None]
    return torch.where(later, scores, torch.zeros_like(scores))


def _stacked(model: Any, name: str) -> Tensor:
    w = getattr(model, name, None)
    if not isinstance(w, Tensor) or w.ndim != 4:
        raise ValueError(
            f"{type(model).__name__} has no stacked {name} [layer, head, ...] weight: composition "
            "scores need W_Q, W_K, W_V, W_O as HookedTransformer stacks them")
    return w


def _has_shift(model: Any) -> bool:
    get = getattr(model, "shift_coefficients", None)
    if not callable(get):
        return False
    coeffs = get()
    values = getattr(coeffs, "values", coeffs)
    if callable(values):
        values = coeffs
    for t in dict(values).values():
        identity = torch.zeros_like(t)
        identity[..., 0] = 1
        if not torch.allclose(t, identity):
            return True
    return False


def all_composition_scores(model: Any, mode: str = "K") -> Float[Tensor, "layer1 head1 layer2 head2"]:
    """:func:`composition_scores_from_weights` on ``model.W_Q``, ``W_K``, ``W_V``, ``W_O``.

    Warns when the model has non-identity shift coefficients: the scores do not see the shift
    path (module docstring); ``probes.circuits.lagged_composition_scores`` splits them by lag.

    Raises:
        ValueError: for a model without stacked attention weights or with fewer than 2 layers.
    """
    _check_mode(mode)
    weights = [_stacked(model, n) for n in ("W_Q", "W_K", "W_V", "W_O")]
    if weights[0].shape[0] < 2:
        raise ValueError(
            f"composition needs at least 2 layers; this model has {weights[0].shape[0]}. A "
            "one-layer KV-shift head composes with the previous position through its coefficients, "
            "which weight-based composition does not see: read it with "
            "probes.circuits.full_qk_circuit (per lag) or measure it with "
            "probes.ablation.remove_shift")
    if _has_shift(model):
        warnings.warn(
            "weight-based composition scores ignore the KV shift path (a shifted head reads the "
            "previous token without composing with an earlier head, and reads an earlier head's "
            "output at the positions its coefficients weight); split them by lag with "
            "probes.circuits.lagged_composition_scores, measure the path by ablation "
            "(probes.ablation.remove_shift)", stacklevel=2)
    return composition_scores_from_weights(*weights, mode=mode)


@torch.no_grad()
def random_composition_baseline(
    d_model: int, d_head: int, mode: str = "K", n_draws: int = 200, seed: int = 0,
) -> tuple[float, float]:
    """``(mean, std)`` of the ``mode``-composition score between two heads whose W_Q, W_K, W_V
    ([d_model, d_head]) and W_O ([d_head, d_model]) are independent standard Gaussians, over
    ``n_draws`` draws from ``torch.Generator().manual_seed(seed)``."""
    _check_mode(mode)
    if n_draws < 2:
        raise ValueError(f"n_draws={n_draws} must be >= 2 to have a spread")
    g = torch.Generator().manual_seed(seed)

    def draw(*shape: int) -> Tensor:
        return torch.randn(n_draws, *shape, generator=g, dtype=torch.float64)

    left = FactoredMatrix(draw(d_model, d_head), draw(d_head, d_model))
    W_Q, W_K, W_V = draw(d_model, d_head), draw(d_model, d_head), draw(d_model, d_head)
    W_O = draw(d_head, d_model)
    if mode == "V":
        right = FactoredMatrix(W_V, W_O)
    else:
        qk = FactoredMatrix(W_Q, W_K.transpose(-2, -1))
        right = qk if mode == "Q" else qk.T
    scores = tl_composition_scores(left, right, broadcast_dims=False)  # [n_draws]
    return float(scores.mean()), float(scores.std())


@dataclass(frozen=True)
class CompositionResult:
    """Composition scores of a model with the random baseline for its shapes."""

    mode: str
    scores: Float[Tensor, "layer1 head1 layer2 head2"]
    baseline_mean: float
    baseline_std: float

    @property
    def z_scores(self) -> Float[Tensor, "layer1 head1 layer2 head2"]:
        """``(score - baseline_mean) / baseline_std``; 0 where there is no path (l1 >= l2)."""
        n_layers = self.scores.shape[0]
        idx = torch.arange(n_layers, device=self.scores.device)
        later = idx[:, None, None, None] < idx[None, None, :, None]
        z = (self.scores - self.baseline_mean) / self.baseline_std
        return torch.where(later, z, torch.zeros_like(z))

    def top(self, k: int = 5) -> list[tuple[tuple[int, int], tuple[int, int], float]]:
        """The ``k`` highest-scoring pairs as ``((l1, h1), (l2, h2), score)``."""
        flat = self.scores.flatten()
        _, n_heads, n_layers2, n_heads2 = self.scores.shape
        out = []
        for i in flat.argsort(descending=True, stable=True)[:k].tolist():
            l1, rest = divmod(i, n_heads * n_layers2 * n_heads2)
            h1, rest = divmod(rest, n_layers2 * n_heads2)
            l2, h2 = divmod(rest, n_heads2)
            out.append(((l1, h1), (l2, h2), float(flat[i])))
        return out


def composition_report(model: Any, mode: str = "K", n_draws: int = 200, seed: int = 0) -> CompositionResult:
    """:func:`all_composition_scores` with :func:`random_composition_baseline` for the model's
    ``d_model`` and ``d_head``."""
    scores = all_composition_scores(model, mode)
    d_model, d_head = model.W_Q.shape[-2:]
    mean, std = random_composition_baseline(int(d_model), int(d_head), mode, n_draws, seed)
    return CompositionResult(mode, scores.detach().cpu(), mean, std)


__all__ = [
    "MODES",
    "CompositionResult",
    "all_composition_scores",
    "composition_report",
    "composition_scores_from_weights",
    "random_composition_baseline",
]
