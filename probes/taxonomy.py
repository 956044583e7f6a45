"""Head taxonomy: previous-token head, induction head via the shift, induction head via composition,
duplicate-token head, other, from attention scores (:mod:`probes.scores`) and shift coefficients.

Rules, per head, first match wins (thresholds are the module constants below)::

    induction >= INDUCTION_THRESHOLD             (value sources: it reads the token to copy)
        and key_past_weight > KEY_SHIFT_THRESHOLD     -> INDUCTION_VIA_SHIFT
        and layer > 0 (key not shifted back)          -> INDUCTION_VIA_COMPOSITION
        (layer 0 without a key shift: no mechanism to match the prefix; a positional trick on a
         fixed period) -> falls through to the rules below
    previous_token >= PREVIOUS_TOKEN_THRESHOLD   (value sources)   -> PREVIOUS_TOKEN
    duplicate_token >= DUPLICATE_TOKEN_THRESHOLD (value sources)   -> DUPLICATE_TOKEN
    otherwise                                                      -> OTHER

and then, per layer with no PREVIOUS_TOKEN head: when the previous-token scores of its OTHER heads
sum to at least PREVIOUS_TOKEN_THRESHOLD, those of them holding at least 1 / n_heads of that
threshold -> PREVIOUS_TOKEN_SHARED (a previous-token role spread over several heads, as two-layer
models with learned absolute positions often grow it: each head attends to t-1 with 0.15-0.2,
together with 0.7, and ablating any one of them costs accuracy).

``key_past_weight`` is the share of the key coefficients on earlier positions,
``sum_{l>=1} |alpha_l| / sum_l |alpha_l|`` (0 for an unshifted head); for the paper's window 1,
``> 0.5`` is ``|alpha1| < |alpha2|``: the key at j describes token j-1 more than token j, so matching
the current token against it is prefix matching done by the shift. The paper's value condition
(``beta1 > beta2``: the value carries token j, the token to copy) is not tested separately: the
induction score on value sources already requires the value read to be the token that followed
the earlier occurrence, and it also covers longer windows (e.g. ``alpha = (0, 0, 1)`` with
``beta = (0, 1, 0)``). A head whose keys look back but whose values read the *matched* token
(``beta2 > beta1``) scores as a duplicate-token head on value sources, which is what it does.

Every rule is scale-free, so it reads a head's mix, never its gain (coefficients are gain x mix,
:func:`kvshift_lens.shift.gain_and_mix`; free coefficients trained fast grow gains of 3-5):
``key_past_weight`` is the key's previous share (``|alpha| / sum |alpha|``), and each score is a
ratio ``sum P * target / sum |P|`` per sequence (:mod:`probes.scores`), so multiplying a head's
value coefficients (hence its value-source pattern) by a positive gain leaves it unchanged; the
key gain only sharpens the softmax, which the scores measure as the attention it is.

"Via composition" is decided from attention and coefficients alone: an induction head in a layer
> 0 whose key is not shifted back must get its prefix information from earlier layers (the
residual stream at j carrying token j-1, written by a previous-token head). Weight-based
K-composition scores (the composition module) confirm it for vanilla models; they do not see the
shift path.

Scores are computed with ``queries="targets"`` (a perfect head scores 1), on repeated random
tokens: pass the model's own tokens (e.g. a ``RepeatedTokensTask`` batch with its BOS) when it was
trained on a task vocabulary.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from probes.effective import key_source_weights
from probes.scores import HeadScores, head_scores

INDUCTION_THRESHOLD = 0.4
"""Min induction score (value sources, ``queries="targets"``) for an induction head: at least 40%
of what the head reads on the second repeat is the token to copy (uniform attention over 30
positions gives about 0.05)."""

PREVIOUS_TOKEN_THRESHOLD = 0.4
"""Min previous-token score (value sources) for a previous-token head."""

DUPLICATE_TOKEN_THRESHOLD = 0.4
"""Min duplicate-token score (value sources) for a duplicate-token head."""

KEY_SHIFT_THRESHOLD = 0.5
"""An induction head is "via the shift" when more than this share of its key coefficients
(``|alpha|``) sits on earlier positions (window 1: ``|alpha1| < |alpha2|``)."""


class HeadKind(str, enum.Enum):
    """What a head does (see the module docstring for the rules)."""

    PREVIOUS_TOKEN = "previous_token"
    PREVIOUS_TOKEN_SHARED = "previous_token_shared"
    INDUCTION_VIA_SHIFT = "induction_via_shift"
    INDUCTION_VIA_COMPOSITION = "induction_via_composition"
    DUPLICATE_TOKEN = "duplicate_token"
    OTHER = "other"

    @property
    def is_induction(self) -> bool:
        return self in (HeadKind.INDUCTION_VIA_SHIFT, HeadKind.INDUCTION_VIA_COMPOSITION)


@dataclass(frozen=True)
class HeadClass:
    """One head's class and the numbers it was decided from.

    Attributes:
        layer, head: the head (query head index).
        kind: its :class:`HeadKind`.
        previous_token, duplicate_token, induction: scores on value sources.
        prefix_matching: induction score on ``hook_pattern``.
        previous_token_plain, duplicate_token_plain: the same scores on ``hook_pattern``.
        key_match: duplicate-token score on key sources.
        copying: OV copying score (NaN when not computed).
        key_past_weight: share of ``|alpha|`` on lags >= 1 (0 when keys are unshifted).
        key_coeffs, value_coeffs: ``(alpha_1, alpha_2, ...)`` and ``(beta_1, ...)``; ``(1.0,)``
            when unshifted.
        reason: the rule that decided ``kind``, in words.
    """

    layer: int
    head: int
    kind: HeadKind
    previous_token: float
    duplicate_token: float
    induction: float
    prefix_matching: float
    previous_token_plain: float
    duplicate_token_plain: float
    key_match: float
    copying: float
    key_past_weight: float
    key_coeffs: tuple[float, ...]
    value_coeffs: tuple[float, ...]
    reason: str


@dataclass(frozen=True)
class HeadTaxonomy:
    """Every head's :class:`HeadClass` (layer-major order) and the scores they came from."""

    heads: list[HeadClass]
    scores: HeadScores

    def __iter__(self):
        return iter(self.heads)

    def __len__(self) -> int:
        return len(self.heads)

    def of(self, layer: int, head: int) -> HeadClass:
        """The class of head ``(layer, head)``."""
        for h in self.heads:
            if (h.layer, h.head) == (layer, head):
                return h
        raise KeyError(f"no head ({layer}, {head}); the model has shape {self.scores.shape}")

    def by_kind(self, kind: HeadKind | str) -> list[HeadClass]:
        """The heads of one kind."""
        kind = HeadKind(kind)
        return [h for h in self.heads if h.kind == kind]

    def kinds(self) -> list[list[HeadKind]]:
        """``kinds()[layer][head]``."""
        n_layers, n_heads = self.scores.shape
        return [[self.of(layer, head).kind for head in range(n_heads)] for layer in range(n_layers)]

    def records(self) -> list[dict[str, Any]]:
        """One dict per head (kind as its string value), e.g. for ``pandas.DataFrame``."""
        return [{**h.__dict__, "kind": h.kind.value} for h in self.heads]


def _key_past_weight(key_coeffs: Tensor | None, n_layers: int, n_heads: int) -> Tensor:
    if key_coeffs is None or key_coeffs.shape[-1] < 2:
        return torch.zeros(n_layers, n_heads)
    return key_source_weights(key_coeffs)[..., 1:].sum(-1)


def _coeff_tuple(coeffs: Tensor | None, layer: int, head: int) -> tuple[float, ...]:
    return (1.0,) if coeffs is None else tuple(float(x) for x in coeffs[layer, head])


def classify_from_scores(
    scores: HeadScores,
    *,
    induction_threshold: float = INDUCTION_THRESHOLD,
    previous_token_threshold: float = PREVIOUS_TOKEN_THRESHOLD,
    duplicate_token_threshold: float = DUPLICATE_TOKEN_THRESHOLD,
    key_shift_threshold: float = KEY_SHIFT_THRESHOLD,
) -> HeadTaxonomy:
    """Classify every head from precomputed :class:`~probes.scores.HeadScores` (pure; the rules
    are in the module docstring)."""
    n_layers, n_heads = scores.shape
    key_past = _key_past_weight(scores.key_coeffs, n_layers, n_heads)
    heads = []
    for layer in range(n_layers):
        for head in range(n_heads):
            ind = float(scores.induction[layer, head])
            prev = float(scores.previous_token[layer, head])
            dup = float(scores.duplicate_token[layer, head])
            kp = float(key_past[layer, head])
            if ind >= induction_threshold and kp > key_shift_threshold:
                kind = HeadKind.INDUCTION_VIA_SHIFT
                reason = (f"induction {ind:.2f} >= {induction_threshold} and key weight on earlier "
                          f"positions {kp:.2f} > {key_shift_threshold}")
            elif ind >= induction_threshold and layer > 0:
                kind = HeadKind.INDUCTION_VIA_COMPOSITION
                reason = (f"induction {ind:.2f} >= {induction_threshold} in layer {layer} > 0 with "
                          f"key weight on earlier positions {kp:.2f} <= {key_shift_threshold}")
            elif prev >= previous_token_threshold:
                kind = HeadKind.PREVIOUS_TOKEN
                reason = f"previous-token {prev:.2f} >= {previous_token_threshold}"
            elif dup >= duplicate_token_threshold:
                kind = HeadKind.DUPLICATE_TOKEN
                reason = f"duplicate-token {dup:.2f} >= {duplicate_token_threshold}"
            else:
                kind = HeadKind.OTHER
                reason = "no score above its threshold"
                if ind >= induction_threshold:
                    reason = (f"induction {ind:.2f} in layer 0 without a key shift: no mechanism for "
                              "prefix matching (positional?)")
            copy = float("nan") if scores.copying is None else float(scores.copying[layer, head])
            heads.append(HeadClass(
                layer=layer, head=head, kind=kind, previous_token=prev, duplicate_token=dup,
                induction=ind, prefix_matching=float(scores.prefix_matching[layer, head]),
                previous_token_plain=float(scores.previous_token_plain[layer, head]),
                duplicate_token_plain=float(scores.duplicate_token_plain[layer, head]),
                key_match=float(scores.key_match[layer, head]), copying=copy, key_past_weight=kp,
                key_coeffs=_coeff_tuple(scores.key_coeffs, layer, head),
                value_coeffs=_coeff_tuple(scores.value_coeffs, layer, head), reason=reason,
            ))
    return HeadTaxonomy(heads=_shared_previous_token(heads, previous_token_threshold, n_heads),
                        scores=scores)


def _shared_previous_token(heads: list[HeadClass], threshold: float,
                           n_heads: int) -> list[HeadClass]:
    """Mark a layer's previous-token role spread over several OTHER heads (module docstring)."""
    out = list(heads)
    layers = sorted({h.layer for h in heads})
    for layer in layers:
        here = [i for i, h in enumerate(out) if h.layer == layer]
        if any(out[i].kind == HeadKind.PREVIOUS_TOKEN for i in here):
            continue
        others = [i for i in here if out[i].kind == HeadKind.OTHER]
        total = sum(out[i].previous_token for i in others)
        if total < threshold:
            continue
        for i in others:
            h = out[i]
            if h.previous_token >= threshold / n_heads:
                out[i] = dataclasses.replace(
                    h, kind=HeadKind.PREVIOUS_TOKEN_SHARED,
                    reason=(f"previous-token {h.previous_token:.2f}, with layer {layer}'s other "
                            f"heads together at {total:.2f} >= {threshold}: a shared "
                            "previous-token role"))
    return out


def classify_heads(
    model: Any,
    tokens: Int[Tensor, "batch pos"] | None = None,
    **thresholds: float,
) -> HeadTaxonomy:
    """Classify every head of ``model`` on repeated random tokens.

    Args:
        model: a TransformerLens-style model (``cfg``, ``blocks.{l}.attn.hook_pattern``,
            ``run_with_cache``); ``shift_coefficients()`` is read when present.
        tokens: ``[batch, pos]`` repeated random tokens (e.g. ``r r`` or ``BOS r r``); default
            :func:`~probes.scores.default_repeated_tokens`.
        thresholds: overrides for :func:`classify_from_scores` (``induction_threshold``, ...).

    Returns:
        A :class:`HeadTaxonomy`: ``.heads`` (one :class:`HeadClass` per head), ``.of(l, h)``,
        ``.by_kind(kind)``, ``.scores``.
    """
    return classify_from_scores(head_scores(model, tokens), **thresholds)


__all__ = [
    "DUPLICATE_TOKEN_THRESHOLD",
    "INDUCTION_THRESHOLD",
    "KEY_SHIFT_THRESHOLD",
    "PREVIOUS_TOKEN_THRESHOLD",
    "HeadClass",
    "HeadKind",
    "HeadTaxonomy",
    "classify_from_scores",
    "classify_heads",
]
