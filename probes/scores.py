"""Per-head scores: previous-token, duplicate-token, induction / prefix-matching, copying, and the
model's in-context-learning score, each with its exact definition, plus shift-aware versions.

Two layers of API:

- **Pure functions on tensors** (testable on hand-written patterns): the detection patterns
  (:func:`previous_token_detection`, :func:`duplicate_token_detection`,
  :func:`induction_detection`), :func:`detection_score`, and the scores built on them
  (:func:`previous_token_score`, :func:`duplicate_token_score`, :func:`induction_score`,
  :func:`prefix_matching_score`, :func:`copying_score`,
  :func:`in_context_learning_score_from_losses`).
- **Model wrappers** returning ``[layer, head]`` (``*_scores(model, tokens)``), and
  :func:`head_scores`, every score from one forward pass, which the taxonomy reads.

Attention scores (what the pure functions compute). Given a pattern ``P[b, h, i, j]`` (any of the
three source patterns below) and a 0/1 detection pattern ``D[b, i, j]`` marking where the head
"should" look, the score of head h on sequence b over a set of query rows R is::

    score_b = sum_{i in R, j} P[b, h, i, j] * D[b, i, j]  /  sum_{i in R, j} |P[b, h, i, j]|

and the reported score is the mean of ``score_b`` over the batch. With ``queries="all"`` R holds
every row: on a plain pattern (rows sum to 1) that is exactly TransformerLens'
``head_detector.detect_head(..., error_measure="mul")`` (and its mean over a list of prompts), so
rows that have no target (position 0 for the previous token, the first repeat for induction) count
as zero and a perfect head scores below 1. With ``queries="targets"`` (the default) R holds the rows
that have at least one target, so the score is the mean attention on the targets over the queries
that can attend to one, and a perfect head scores 1 (e.g. the previous-token score is then
``mean_{i >= 1} P[i, i-1]``, the induction score on ``r r`` is ``mean_{i in 2nd repeat}`` of the
attention to the token after i's earlier occurrence: the usual "induction stripe"). Sequences with
no target row are left out of the batch mean. ``exclude_bos`` / ``exclude_current_token`` drop key
column 0 / the diagonal from both P and D, as detect_head does.

Which pattern (``source``), and what the scores mean for a KV-shifted head (DESIGN.md,
:mod:`probes.effective`):

- ``"position"``: ``hook_pattern``, the positions attended. This is what detect_head sees.
- ``"value"`` (``effective=True`` in the wrappers): the value-source pattern ``A_eff``, the weight
  with which each token's *value* is read. This is what a head's output is made of, so the
  previous-token, duplicate-token and induction scores use it by default: "previous-token head"
  means "reads the previous token", "induction head" means "reads the token that followed the
  earlier occurrence of the current token" (the token it should copy). For an unshifted head it
  equals the position pattern.
- ``"key"``: the key-source pattern (which tokens the attended keys are built from);
  ``key_match`` is the duplicate-token score on it: how much of what the query matched is its own
  token (1 for a prefix-matching head whose key shift looks one token back).

Worked through for window 1 (``alpha`` keys, ``beta`` values), on ``... A B ... A`` with the query at
the second A:

- The ideal one-layer shift induction head ``alpha = (0, 1), beta = (1, 0)``: key j describes
  token j-1, so the query attends to the *position of B* (its key says "A came before me") and reads
  B's value. Position pattern: induction stripe (prefix matching 1). Value sources: the same
  (induction 1). Key sources: the earlier A (key_match 1). detect_head's verdict is right, but
  only the coefficients say *how* (the shift, not a previous-token head in an earlier layer).
- ``alpha = (0, 1), beta = (0, 1)``: attends to B's position too (prefix matching 1, detect_head
  calls it an induction head) but reads the value of the earlier A: it copies the current token,
  not the next one. Value sources: duplicate-token 1, induction 0.
- With window 2, ``alpha = (0, 0, 1), beta = (0, 1, 0)`` is an induction head that attends to the
  position *after* B (its key describes A, two back) and reads B (one back). Position pattern:
  induction 0 (detect_head misses it); value sources: induction 1.
- ``beta = (0, 1)`` on a head that attends to its own position reads the previous token:
  previous-token 0 on the position pattern, 1 on value sources.

Prefix matching (Olsson et al. 2022) is a property of *where the head attends*: it is the
induction score on the position pattern, always (the shift is part of how the key comes to match
the prefix, which is the point). Copying is a property of the OV weights and ignores the shift
(see :func:`copying_score`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

from probes._hooks import get_patterns, head_coefficients, model_dims, prepare_tokens
from probes.effective import effective_key_sources, effective_pattern

QueryRows = Literal["targets", "all"]
Source = Literal["position", "value", "key"]


# ---------------------------------------------------------------------------------------------
# Detection patterns (pure functions of the tokens)
# ---------------------------------------------------------------------------------------------


def _tokens_2d(tokens: Tensor) -> Tensor:
    if tokens.ndim == 1:
        tokens = tokens[None]
    if tokens.ndim != 2:
        raise ValueError(f"tokens must have shape [batch, pos] or [pos], got {tuple(tokens.shape)}")
    return tokens


def previous_token_detection(n_pos: int, device: torch.device | str | None = None) -> Bool[Tensor, "pos pos"]:
    """``D[i, j] = (j == i - 1)``: TransformerLens' previous-token detection pattern."""
    return torch.ones(n_pos, n_pos, dtype=torch.bool, device=device).tril(-1).triu(-1)


def duplicate_token_detection(tokens: Int[Tensor, "batch pos"]) -> Bool[Tensor, "batch pos pos"]:
    """``D[b, i, j] = (tokens[b, j] == tokens[b, i]) and j < i``: earlier copies of the current
    token (TransformerLens' duplicate-token detection pattern)."""
    t = _tokens_2d(tokens)
    n = t.shape[1]
    earlier = torch.ones(n, n, dtype=torch.bool, device=t.device).tril(-1)
    return (t[:, :, None] == t[:, None, :]) & earlier


def induction_detection(tokens: Int[Tensor, "batch pos"]) -> Bool[Tensor, "batch pos pos"]:
    """``D[b, i, j] = (tokens[b, j - 1] == tokens[b, i]) and 1 <= j <= i``: the token right after
    an earlier occurrence of the current token (TransformerLens' induction detection pattern: the
    duplicate pattern moved one key to the right)."""
    dup = duplicate_token_detection(tokens)
    out = torch.zeros_like(dup)
    out[..., 1:] = dup[..., :-1]
    return out & torch.ones_like(dup[0]).tril()


# ---------------------------------------------------------------------------------------------
# Scores on patterns (pure)
# ---------------------------------------------------------------------------------------------


def detection_score(
    pattern: Float[Tensor, "... batch head query_pos key_pos"],
    detection: Bool[Tensor, "batch query_pos key_pos"] | Bool[Tensor, "query_pos key_pos"],
    *,
    queries: QueryRows = "targets",
    exclude_bos: bool = False,
    exclude_current_token: bool = False,
) -> Float[Tensor, "... head"]:
    """How much of each head's pattern falls where ``detection`` says (module docstring:
    ``sum_{i in R} P * D / sum_{i in R} |P|`` per sequence, then the batch mean).

    Args:
        pattern: patterns with the batch on dim -4 (e.g. ``[batch, head, q, k]`` for one layer or
            ``[layer, batch, head, q, k]``).
        detection: 0/1 detection pattern per sequence ``[batch, q, k]`` or shared ``[q, k]``.
        queries: "targets" (rows with at least one target) or "all" (every row: detect_head's
            "mul" measure).
        exclude_bos: ignore key position 0 (in P and D), as detect_head does.
        exclude_current_token: ignore the diagonal (in P and D).

    Returns:
        ``[..., head]``: the score per head (leading dims of ``pattern`` before the batch kept).
        A sequence whose rows in R read nothing (``sum |P| == 0``) scores 0.

    Raises:
        ValueError: on shape mismatches, or when no sequence has a target row
            (``queries="targets"``).
    """
    if queries not in ("targets", "all"):
        raise ValueError(f"queries={queries!r} is not one of ['targets', 'all']")
    if pattern.ndim < 4:
        raise ValueError(
            f"pattern must be [..., batch, head, query_pos, key_pos], got {tuple(pattern.shape)}")
    n_batch, _, n_q, n_k = pattern.shape[-4:]
    if detection.ndim == 2:
        detection = detection[None].expand(n_batch, -1, -1)
    if tuple(detection.shape) != (n_batch, n_q, n_k):
        raise ValueError(
            f"detection has shape {tuple(detection.shape)}, expected [batch, query_pos, key_pos] = "
            f"[{n_batch}, {n_q}, {n_k}] to match pattern {tuple(pattern.shape)}")
    d = detection.to(device=pattern.device, dtype=pattern.dtype).clone()
    p = pattern
    if exclude_bos or exclude_current_token:
        p = p.clone()
        if exclude_bos:
            p[..., 0] = 0
            d[..., 0] = 0
        if exclude_current_token:
            p.diagonal(dim1=-2, dim2=-1).zero_()
            d.diagonal(dim1=-2, dim2=-1).zero_()
    d = d[:, None]  # [batch, 1, q, k]: broadcast over heads
    if queries == "all":
        rows = torch.ones(n_batch, 1, n_q, dtype=p.dtype, device=p.device)
    else:
        rows = (d > 0).any(-1).to(p.dtype)  # [batch, 1, q]
    num = ((p * d).sum(-1) * rows).sum(-1)  # [..., batch, head]
    den = (p.abs().sum(-1) * rows).sum(-1)
    per_seq = torch.where(den > 0, num / den.where(den > 0, torch.ones_like(den)), torch.zeros_like(num))
    has_rows = rows.sum(-1)[:, 0] > 0  # [batch]
    if not bool(has_rows.any()):
        raise ValueError(
            "no query position has a target in this batch (e.g. no token repeats), so the score "
            "is undefined; pass tokens with repeats, or queries='all'")
    return per_seq[..., has_rows, :].mean(-2)


def _check_tokens_match(pattern: Tensor, tokens: Tensor) -> Tensor:
    t = _tokens_2d(tokens).to(pattern.device)
    if pattern.ndim < 4 or t.shape[0] != pattern.shape[-4] or t.shape[1] != pattern.shape[-1]:
        raise ValueError(
            f"tokens {tuple(t.shape)} do not match pattern {tuple(pattern.shape)} "
            "([..., batch, head, query_pos, key_pos]: batch and key_pos must agree)")
    return t


def previous_token_score(
    pattern: Float[Tensor, "... batch head query_pos key_pos"],
    *,
    queries: QueryRows = "targets",
    exclude_bos: bool = False,
) -> Float[Tensor, "... head"]:
    """Previous-token score: attention from i to i - 1.

    ``queries="targets"``: ``mean over sequences and i >= 1 of P[i, i-1]`` (rows normalised by
    ``sum_j |P[i, j]|``, which is 1 for a plain pattern). ``queries="all"``:
    ``sum_{i>=1} P[i, i-1] / sum_{i, j} P[i, j]`` per sequence, i.e. detect_head's
    ``"previous_token_head"`` with ``error_measure="mul"`` (max ``(n-1)/n``).
    """
    if pattern.ndim < 4:
        raise ValueError(
            f"pattern must be [..., batch, head, query_pos, key_pos], got {tuple(pattern.shape)}")
    det = previous_token_detection(pattern.shape[-1], pattern.device)
    return detection_score(pattern, det, queries=queries, exclude_bos=exclude_bos)


def duplicate_token_score(
    pattern: Float[Tensor, "... batch head query_pos key_pos"],
    tokens: Int[Tensor, "batch pos"],
    *,
    queries: QueryRows = "targets",
    exclude_bos: bool = False,
    exclude_current_token: bool = False,
) -> Float[Tensor, "... head"]:
    """Duplicate-token score: attention from i to earlier positions holding the same token
    (:func:`duplicate_token_detection`); ``queries="all"`` is detect_head's
    ``"duplicate_token_head"`` ("mul")."""
    t = _check_tokens_match(pattern, tokens)
    return detection_score(pattern, duplicate_token_detection(t), queries=queries,
                           exclude_bos=exclude_bos, exclude_current_token=exclude_current_token)


def induction_score(
    pattern: Float[Tensor, "... batch head query_pos key_pos"],
    tokens: Int[Tensor, "batch pos"],
    *,
    queries: QueryRows = "targets",
    exclude_bos: bool = False,
    exclude_current_token: bool = False,
) -> Float[Tensor, "... head"]:
    """Induction score: attention from i to the position right after an earlier occurrence of
    token i (:func:`induction_detection`). On repeated random tokens ``r r`` with distinct ``r``
    of length n and ``queries="targets"``, it is the mean over the second repeat's queries i of
    ``P[i, i - n + 1]`` (Olsson et al. 2022, TransformerLens' induction stripe).
    ``queries="all"`` is detect_head's ``"induction_head"`` ("mul").

    On a value-source pattern this measures reading the token to copy; on the position pattern it
    is the prefix-matching score.
    """
    t = _check_tokens_match(pattern, tokens)
    return detection_score(pattern, induction_detection(t), queries=queries,
                           exclude_bos=exclude_bos, exclude_current_token=exclude_current_token)


def prefix_matching_score(
    pattern: Float[Tensor, "... batch head query_pos key_pos"],
    tokens: Int[Tensor, "batch pos"],
    *,
    queries: QueryRows = "targets",
) -> Float[Tensor, "... head"]:
    """Olsson et al.'s prefix-matching score: on repeated random tokens, the attention from each
    token to the token that followed its earlier occurrence. Pass the *position* pattern
    (``hook_pattern``): this is :func:`induction_score` on it."""
    return induction_score(pattern, tokens, queries=queries)


def copying_score(
    W_E: Float[Tensor, "d_vocab d_model"],
    W_V: Float[Tensor, "... head d_model d_head"],
    W_O: Float[Tensor, "... head d_head d_model"],
    W_U: Float[Tensor, "d_model d_vocab"],
) -> Float[Tensor, "... head"]:
    """Copying score of each head's full OV circuit (Elhage et al. 2021, used by Olsson et al.
    2022): with ``M = W_E W_V W_O W_U`` (``M[s, t]``: how attending to token s moves the logit of
    token t) and its eigenvalues ``lambda``::

        copying = Re(sum lambda) / sum |lambda|        in [-1, 1]

    1 when every eigenvalue is positive (the head raises the logit of the token it attends to),
    -1 when every one is negative (anti-copying), NaN for a zero circuit. For real eigenvalues the
    variant "sum of positive eigenvalues / sum of absolute eigenvalues" equals
    ``(1 + copying) / 2``. The non-zero eigenvalues of ``M = (W_E W_V)(W_O W_U)`` are those of the
    small ``(W_O W_U)(W_E W_V)`` ``[d_head, d_head]``, which is what is computed (in float64), as
    TransformerLens' ``FactoredMatrix.eigenvalues`` does.

    Weights only: normalisation is ignored (fold it into the weights first), and so is the shift.
    Under a value shift the value of token s reaches a query through lag l as ``beta_l`` times this
    same OV map, so a negative ``beta_l`` flips the sign of what is copied from that lag.
    """
    a = W_E.double() @ W_V.double()  # [..., head, d_vocab, d_head]
    b = W_O.double() @ W_U.double()  # [..., head, d_head, d_vocab]
    eig = torch.linalg.eigvals(b @ a)  # [..., head, d_head]
    return (eig.sum(-1).real / eig.abs().sum(-1)).float()


def token_losses(
    logits: Float[Tensor, "batch pos d_vocab"], tokens: Int[Tensor, "batch pos"]
) -> Float[Tensor, "batch pos_minus_1"]:
    """Next-token cross entropy per position: entry t is ``-log p(tokens[t + 1] | tokens[:t + 1])``
    (TransformerLens' ``loss_per_token`` convention)."""
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    return -logp.gather(-1, tokens[:, 1:, None].to(logits.device))[..., 0]


def in_context_learning_score_from_losses(
    losses: Float[Tensor, "batch pos_minus_1"], early: int = 50, late: int = 500
) -> float:
    """Olsson et al.'s in-context-learning score: the loss on the token at index ``late`` minus the
    loss on the token at index ``early``, averaged over the batch (negative: later tokens, with
    more context, are predicted better; Olsson et al. use 500 and 50).

    Args:
        losses: per-token losses in TransformerLens' convention, ``losses[:, t]`` the loss on
            token ``t + 1`` (:func:`token_losses`); the token at index p (predicted from the p
            tokens before it) is ``losses[:, p - 1]``.
        early, late: token indices, ``1 <= early < late <= pos - 1``.
    """
    n = losses.shape[-1]  # tokens 1 .. n have a loss
    if not 1 <= early < late <= n:
        raise ValueError(
            f"need 1 <= early < late <= {n} (token indices with a loss in a sequence of {n + 1} "
            f"tokens), got early={early}, late={late}")
    return float((losses[:, late - 1] - losses[:, early - 1]).mean())


# ---------------------------------------------------------------------------------------------
# Model wrappers
# ---------------------------------------------------------------------------------------------


def repeated_random_tokens(
    batch_size: int,
    run_length: int,
    d_vocab: int,
    *,
    n_repeats: int = 2,
    first_token: int = 0,
    prefix_token: int | None = None,
    distinct: bool = True,
    generator: torch.Generator | None = None,
) -> Int[Tensor, "batch pos"]:
    """``[prefix] r r ...``: a random run ``r`` of ``run_length`` ids from
    ``first_token .. d_vocab - 1`` (without replacement when ``distinct``), written ``n_repeats``
    times, after an optional ``prefix_token`` (e.g. BOS). On CPU."""
    n = d_vocab - first_token
    if run_length < 1 or n_repeats < 1 or batch_size < 1:
        raise ValueError("batch_size, run_length and n_repeats must be >= 1")
    if distinct and run_length > n:
        raise ValueError(f"distinct run_length={run_length} needs at least that many ids, have {n}")
    if distinct:
        run = torch.rand(batch_size, n, generator=generator).argsort(-1)[:, :run_length]
    else:
        run = torch.randint(0, n, (batch_size, run_length), generator=generator)
    out = (run + first_token).repeat(1, n_repeats)
    if prefix_token is not None:
        out = torch.cat([torch.full((batch_size, 1), prefix_token, dtype=torch.long), out], 1)
    return out


def default_repeated_tokens(model: Any, batch_size: int = 8, seed: int = 0) -> Int[Tensor, "batch pos"]:
    """Repeated random tokens sized to the model: ``r r`` with distinct ``r`` of
    ``min(32, (n_ctx - 1) // 2, d_vocab)`` ids from the whole vocabulary (a model trained with a BOS
    or on a sub-vocabulary should be given its own tokens instead)."""
    cfg = model.cfg
    run = min(32, (int(cfg.n_ctx) - 1) // 2, int(cfg.d_vocab))
    return repeated_random_tokens(batch_size, run, int(cfg.d_vocab),
                                  generator=torch.Generator().manual_seed(seed))


@dataclass(frozen=True)
class SourcePatterns:
    """The three patterns of every head on one batch, each ``[layer, batch, head, query_pos,
    key_pos]`` on the model's device.

    Attributes:
        position: ``hook_pattern``: the positions attended.
        value: value sources (:func:`probes.effective.effective_pattern`): whose value is read.
        key: key sources (:func:`probes.effective.effective_key_sources`): which tokens the
            attended keys are built from.
        tokens: the ``[batch, pos]`` tokens they were computed on.
        logits: the model's logits on them.
    """

    position: Tensor
    value: Tensor
    key: Tensor
    tokens: Tensor
    logits: Tensor

    def __getitem__(self, source: Source) -> Tensor:
        if source not in ("position", "value", "key"):
            raise KeyError(f"source {source!r} is not one of ['position', 'value', 'key']")
        return getattr(self, source)


def source_patterns(model: Any, tokens: Int[Tensor, "batch pos"]) -> SourcePatterns:
    """Run ``model`` on ``tokens`` once and return the position, value-source and key-source
    patterns of every head (value/key sources equal the position pattern for unshifted heads)."""
    tokens = prepare_tokens(model, tokens)
    pattern, logits = get_patterns(model, tokens, return_logits=True)
    value, key = pattern.clone(), pattern.clone()
    v_coeffs, k_coeffs = head_coefficients(model, "v"), head_coefficients(model, "k")
    for layer in range(pattern.shape[0]):
        if v_coeffs is not None:
            value[layer] = effective_pattern(pattern[layer], v_coeffs[layer])
        if k_coeffs is not None:
            key[layer] = effective_key_sources(pattern[layer], k_coeffs[layer])
    return SourcePatterns(position=pattern, value=value, key=key, tokens=tokens, logits=logits)


def _source(effective: bool) -> Source:
    return "value" if effective else "position"


def previous_token_scores(
    model: Any, tokens: Int[Tensor, "batch pos"], *, effective: bool = True,
    queries: QueryRows = "targets", exclude_bos: bool = False,
) -> Float[Tensor, "layer head"]:
    """:func:`previous_token_score` of every head on ``tokens``: on value sources ("does the head
    read the previous token") with ``effective``, else on ``hook_pattern`` (detect_head's view)."""
    pats = source_patterns(model, tokens)
    return previous_token_score(pats[_source(effective)], queries=queries, exclude_bos=exclude_bos).cpu()


def duplicate_token_scores(
    model: Any, tokens: Int[Tensor, "batch pos"], *, effective: bool = True,
    queries: QueryRows = "targets", exclude_bos: bool = False,
) -> Float[Tensor, "layer head"]:
    """:func:`duplicate_token_score` of every head (value sources with ``effective``)."""
    pats = source_patterns(model, tokens)
    return duplicate_token_score(pats[_source(effective)], pats.tokens, queries=queries,
                                 exclude_bos=exclude_bos).cpu()


def induction_scores(
    model: Any, tokens: Int[Tensor, "batch pos"] | None = None, *, effective: bool = True,
    queries: QueryRows = "targets", exclude_bos: bool = False,
) -> Float[Tensor, "layer head"]:
    """:func:`induction_score` of every head on repeated random tokens (``tokens``, or
    :func:`default_repeated_tokens`): with ``effective``, on value sources (reads the token that
    followed the earlier occurrence: the token to copy); without, on ``hook_pattern`` (the
    prefix-matching score, detect_head's view)."""
    tokens = default_repeated_tokens(model) if tokens is None else tokens
    pats = source_patterns(model, tokens)
    return induction_score(pats[_source(effective)], pats.tokens, queries=queries,
                           exclude_bos=exclude_bos).cpu()


def prefix_matching_scores(
    model: Any, tokens: Int[Tensor, "batch pos"] | None = None, *, queries: QueryRows = "targets",
) -> Float[Tensor, "layer head"]:
    """Olsson et al.'s prefix-matching score of every head (induction score on ``hook_pattern``)
    on repeated random tokens (``tokens``, or :func:`default_repeated_tokens`)."""
    return induction_scores(model, tokens, effective=False, queries=queries)


def copying_scores(model: Any) -> Float[Tensor, "layer head"]:
    """:func:`copying_score` of every head from ``model.W_E``, ``W_V``, ``W_O``, ``W_U`` (stacked
    ``[layer, head, ...]`` TransformerLens weights; per block ``blocks[l].attn.W_V`` otherwise)."""
    n_layers, _ = model_dims(model)
    try:
        W_V, W_O = model.W_V, model.W_O
    except AttributeError:
        W_V = torch.stack([model.blocks[layer].attn.W_V for layer in range(n_layers)])
        W_O = torch.stack([model.blocks[layer].attn.W_O for layer in range(n_layers)])
    with torch.no_grad():
        return copying_score(model.W_E, W_V, W_O, model.W_U).cpu()


@torch.no_grad()
def in_context_learning_score(
    model: Any, tokens: Int[Tensor, "batch pos"], early: int = 50, late: int = 500
) -> float:
    """The model's in-context-learning score on ``tokens``: loss on the token at index ``late``
    minus loss on the token at index ``early`` (:func:`in_context_learning_score_from_losses`;
    Olsson et al.: 500 and 50, so sequences need more than ``late`` tokens)."""
    tokens = prepare_tokens(model, tokens)
    logits = model(tokens)
    return in_context_learning_score_from_losses(token_losses(logits, tokens), early, late)


@dataclass(frozen=True)
class HeadScores:
    """Every attention score of every head on one batch, each ``[layer, head]`` float32 on CPU
    (definitions in the module docstring; "value sources" = the effective pattern).

    Attributes:
        previous_token: previous-token score on value sources.
        duplicate_token: duplicate-token score on value sources.
        induction: induction score on value sources (reads the token to copy).
        previous_token_plain: previous-token score on ``hook_pattern``.
        duplicate_token_plain: duplicate-token score on ``hook_pattern``.
        prefix_matching: induction score on ``hook_pattern`` (Olsson's prefix matching).
        key_match: duplicate-token score on key sources (the query matched its own token).
        copying: OV copying score (:func:`copying_score`), or None when the model does not expose
            ``W_E`` / ``W_V`` / ``W_O`` / ``W_U``.
        key_coeffs, value_coeffs: shift coefficients per query head ``[layer, head, lag]``, or
            None when unshifted.
    """

    previous_token: Tensor
    duplicate_token: Tensor
    induction: Tensor
    previous_token_plain: Tensor
    duplicate_token_plain: Tensor
    prefix_matching: Tensor
    key_match: Tensor
    copying: Tensor | None = None
    key_coeffs: Tensor | None = None
    value_coeffs: Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.induction.shape)


def head_scores(
    model: Any, tokens: Int[Tensor, "batch pos"] | None = None, *, queries: QueryRows = "targets",
    copying: bool = True,
) -> HeadScores:
    """All pattern scores of every head from one forward pass on repeated random tokens
    (``tokens``, or :func:`default_repeated_tokens`), plus copying scores and coefficients.

    The tokens must have repeats (for the duplicate and induction scores); repeated random tokens
    serve all scores. ``copying=False`` skips the eigenvalue computation (large vocabularies).
    """
    tokens = default_repeated_tokens(model) if tokens is None else tokens
    pats = source_patterns(model, tokens)
    t = pats.tokens

    def score(fn, source: Source, *args) -> Tensor:
        return fn(pats[source], *args, queries=queries).float().cpu()

    copy = None
    if copying:
        try:
            copy = copying_scores(model)
        except AttributeError:
            copy = None
    return HeadScores(
        previous_token=score(previous_token_score, "value"),
        duplicate_token=score(duplicate_token_score, "value", t),
        induction=score(induction_score, "value", t),
        previous_token_plain=score(previous_token_score, "position"),
        duplicate_token_plain=score(duplicate_token_score, "position", t),
        prefix_matching=score(induction_score, "position", t),
        key_match=score(duplicate_token_score, "key", t),
        copying=copy,
        key_coeffs=head_coefficients(model, "k"),
        value_coeffs=head_coefficients(model, "v"),
    )


__all__ = [
    "HeadScores",
    "SourcePatterns",
    "copying_score",
    "copying_scores",
    "default_repeated_tokens",
    "detection_score",
    "duplicate_token_detection",
    "duplicate_token_score",
    "duplicate_token_scores",
    "head_scores",
    "in_context_learning_score",
    "in_context_learning_score_from_losses",
    "induction_detection",
    "induction_score",
    "induction_scores",
    "prefix_matching_score",
    "prefix_matching_scores",
    "previous_token_detection",
    "previous_token_score",
    "previous_token_scores",
    "repeated_random_tokens",
    "source_patterns",
    "token_losses",
]
