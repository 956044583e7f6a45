"""Synthetic tasks for induction experiments, generated on the fly from an explicit generator.

Every task is a small frozen dataclass whose fields are its parameters, checked when it is built.
``task.sample(batch_size, generator)`` draws a :class:`Batch`; ``task.metrics(logits, batch)``
scores a model's logits on it; ``task.max_accuracy`` and ``task.min_loss`` state what a perfect
model can reach. :data:`TASKS` and :func:`make_task` build tasks by name.

Conventions shared by every task:

- Shapes use the package's axis names ``batch``, ``pos`` and ``d_vocab``.
- ``Batch.mask[b, t]`` is True where the token after ``t``, ``tokens[b, t + 1]``, follows from the
  task's rule and the tokens up to ``t``. A model's prediction for it is ``logits[b, t]``; accuracy
  and loss are measured only at masked positions (so ``mask[:, -1]`` is always False).
- Token ids lie in ``range(task.d_vocab)``. With ``bos=True``, position 0 holds :data:`BOS_TOKEN`
  (id 0) and no other position does; the task's own tokens ("content tokens") are then
  ``1 .. d_vocab - 1``. With ``bos=False`` every id is a content token.
- Randomness comes only from the ``torch.Generator`` passed to ``sample`` (and, for the n-gram
  table, from the task's ``table_seed``): the same generator state gives the same batch, and the
  global RNG is neither read nor advanced. A batch is made on the generator's device; the same seed
  on another device type gives a different (equally valid) batch.
- ``max_accuracy`` is the masked-position accuracy of the Bayes-optimal predictor that knows the
  task's parameters but not the hidden random choices behind a sequence; ``min_loss`` is its
  masked cross-entropy in nats. Both are exact, not estimates.
"""

from __future__ import annotations

import abc
import dataclasses
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

BOS_TOKEN = 0
"""The id of the beginning-of-sequence token of every task built with ``bos=True``."""

IGNORE_INDEX = -100
"""``Batch.targets`` at unmasked positions: PyTorch's default ``ignore_index`` for cross-entropy."""


# ---------------------------------------------------------------------------------------------
# Batches and metrics
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Batch:
    """A batch of sequences and the positions where the task's rule predicts the next token.

    Attributes:
        tokens: ``[batch, pos]`` token ids (int64).
        mask: ``[batch, pos]`` bool; True at ``t`` when ``tokens[:, t + 1]`` is predictable by the
            task's rule from ``tokens[:, : t + 1]``. Never True at the last position.
        info: per-sequence facts about how the batch was generated (for example the offset of the
            copy in :class:`InductionTask`), each a tensor whose first axis is ``batch``. Tasks
            document their keys. Tests and analyses read them; a model must not.
    """

    tokens: Int[Tensor, "batch pos"]
    mask: Bool[Tensor, "batch pos"]
    info: Mapping[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.tokens.ndim != 2 or self.tokens.dtype != torch.long:
            raise ValueError(
                "Batch.tokens must be an int64 tensor of shape [batch, pos]; got dtype "
                f"{self.tokens.dtype} and shape {tuple(self.tokens.shape)}"
            )
        if self.mask.shape != self.tokens.shape or self.mask.dtype != torch.bool:
            raise ValueError(
                f"Batch.mask must be a bool tensor shaped like tokens {tuple(self.tokens.shape)}; "
                f"got dtype {self.mask.dtype} and shape {tuple(self.mask.shape)}"
            )
        if self.tokens.shape[1] == 0 or bool(self.mask[:, -1].any()):
            raise ValueError("Batch.mask must be False at the last position, which has no next token")

    @property
    def targets(self) -> Int[Tensor, "batch pos"]:
        """``tokens[:, t + 1]`` where ``mask[:, t]``, :data:`IGNORE_INDEX` elsewhere, so that
        ``F.cross_entropy(logits.flatten(0, 1), targets.flatten())`` is the masked loss."""
        nxt = torch.full_like(self.tokens, IGNORE_INDEX)
        nxt[:, :-1] = self.tokens[:, 1:]
        return nxt.masked_fill(~self.mask, IGNORE_INDEX)

    @property
    def n_predictions(self) -> int:
        """The number of masked positions in the batch."""
        return int(self.mask.sum())

    def to(self, device: torch.device | str) -> Batch:
        """The same batch with every tensor (``info`` included) on ``device``."""
        return Batch(
            tokens=self.tokens.to(device),
            mask=self.mask.to(device),
            info={k: v.to(device) for k, v in self.info.items()},
        )


def _check_logits(
    logits: Float[Tensor, "batch pos d_vocab"], batch: Batch, d_vocab: int | None = None
) -> None:
    b, p = batch.tokens.shape
    if logits.ndim != 3 or tuple(logits.shape[:2]) != (b, p):
        raise ValueError(
            f"logits must have shape [batch, pos, d_vocab] = [{b}, {p}, d_vocab] to match "
            f"batch.tokens; got {tuple(logits.shape)}"
        )
    need = d_vocab if d_vocab is not None else int(batch.tokens.max()) + 1
    if logits.shape[-1] < need:
        raise ValueError(
            f"logits have d_vocab={logits.shape[-1]}, but the task's tokens need at least {need}"
        )
    if batch.n_predictions == 0:
        raise ValueError("the batch has no masked positions, so there is nothing to score")


def masked_cross_entropy(
    logits: Float[Tensor, "batch pos d_vocab"],
    targets: Batch | Int[Tensor, "batch pos"],
    reduction: str = "mean",
) -> Float[Tensor, ""]:
    """Cross-entropy (nats) of ``logits[:, t]`` against ``tokens[:, t + 1]`` over the masked
    positions: the one masked loss of the toolkit (training, evaluation, the loss landscape).
    Differentiable; half-precision logits are promoted to float32, others keep their precision.

    Args:
        logits: ``[batch, pos, d_vocab]``; ``d_vocab`` may exceed the task's (a larger model vocab).
        targets: the batch the logits were computed on, or its ``targets`` (:data:`IGNORE_INDEX`
            where nothing is predicted).
        reduction: ``"mean"`` over masked positions, or ``"sum"`` (a data-parallel trainer divides
            by the global count itself).
    """
    if isinstance(targets, Batch):
        _check_logits(logits, targets)
        targets = targets.targets
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(),
                           ignore_index=IGNORE_INDEX, reduction=reduction)


def masked_metrics(logits: Float[Tensor, "batch pos d_vocab"], batch: Batch) -> dict[str, float]:
    """Accuracy and loss on the masked positions of ``batch``.

    Returns:
        ``accuracy``: fraction of masked positions where ``logits[:, t].argmax()`` equals
        ``tokens[:, t + 1]`` (ties go to the lowest id, as ``argmax`` does); ``loss``: mean
        cross-entropy in nats (:func:`masked_cross_entropy`); ``n_predictions``: how many
        positions were scored (to weight means across batches or processes).
    """
    _check_logits(logits, batch)
    with torch.no_grad():
        logits = logits.detach()
        # Boolean indexing walks [batch, pos] in the same order for both tensors.
        sel, target = logits[batch.mask], batch.tokens[:, 1:][batch.mask[:, :-1]]
        accuracy = (sel.argmax(dim=-1) == target).float().mean()
        loss = masked_cross_entropy(logits, batch.targets)
    return {
        "accuracy": float(accuracy),
        "loss": float(loss),
        "n_predictions": float(target.numel()),
    }


def induction_predictions(
    tokens: Int[Tensor, "batch pos"],
) -> tuple[Int[Tensor, "batch pos"], Bool[Tensor, "batch pos"]]:
    """What an ideal one-token induction head predicts at every position.

    At position ``t`` with token ``A = tokens[t]``: find the most recent ``j < t`` with
    ``tokens[j] == A`` and predict ``tokens[j + 1]`` (the token that followed ``A`` last time).

    Returns:
        ``(predictions, found)``, both ``[batch, pos]``. ``found[b, t]`` is False when ``A`` has no
        earlier occurrence; ``predictions`` is 0 there and means nothing.
    """
    n_pos = tokens.shape[1]
    same = tokens[:, :, None] == tokens[:, None, :]  # [batch, query_pos, key_pos]
    earlier = torch.ones(n_pos, n_pos, dtype=torch.bool, device=tokens.device).tril(diagonal=-1)
    candidates = same & earlier
    found = candidates.any(dim=-1)
    key_index = torch.arange(1, n_pos + 1, device=tokens.device)
    latest = (candidates * key_index).argmax(dim=-1)  # [batch, query_pos]; 0 where none
    predictions = tokens.gather(1, (latest + 1).clamp(max=n_pos - 1))
    return predictions.masked_fill(~found, 0), found


def induction_accuracy(batch: Batch) -> float:
    """Accuracy of :func:`induction_predictions` on the masked positions of ``batch``: how far a
    model gets with nothing but an ideal one-token induction head (no match counts as wrong)."""
    predictions, found = induction_predictions(batch.tokens)
    target = batch.tokens[:, 1:][batch.mask[:, :-1]]
    correct = found[batch.mask] & (predictions[batch.mask] == target)
    return float(correct.float().mean())


# ---------------------------------------------------------------------------------------------
# Shared machinery: validation and random draws
# ---------------------------------------------------------------------------------------------


def _fail(task: Any, name: str, value: Any, constraint: str) -> ValueError:
    return ValueError(f"{type(task).__name__}: {name}={value!r} is invalid: {constraint}")


def _require_int(task: Any, name: str, minimum: int, why: str) -> int:
    value = getattr(task, name)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise _fail(task, name, value, f"it must be an int, not {type(value).__name__}")
    if value < minimum:
        raise _fail(task, name, value, f"it must be >= {minimum} ({why})")
    object.__setattr__(task, name, int(value))  # normalise numpy ints; the dataclass is frozen
    return int(value)


def _require_bool(task: Any, name: str) -> bool:
    value = getattr(task, name)
    if not isinstance(value, bool):
        raise _fail(task, name, value, f"it must be True or False, not {type(value).__name__}")
    return value


def _check_sample_args(batch_size: int, generator: torch.Generator) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral):
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not isinstance(generator, torch.Generator):
        raise TypeError(
            "generator must be a torch.Generator (tasks never draw from the global RNG), got "
            f"{type(generator).__name__}"
        )


def _uniform(shape: tuple[int, ...], generator: torch.Generator) -> Float[Tensor, "..."]:
    # float64 so that floor(u * n) stays below n for any n we use.
    return torch.rand(shape, generator=generator, device=generator.device, dtype=torch.float64)


def _randint(high: Tensor | int, shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
    """Independent uniform ints in ``[0, high)``; ``high`` broadcasts against ``shape``."""
    draws = (_uniform(shape, generator) * high).long()
    return torch.minimum(draws, torch.as_tensor(high, device=draws.device) - 1)


def _permutations(batch_size: int, n: int, generator: torch.Generator) -> Int[Tensor, "batch n"]:
    """One uniform random permutation of ``range(n)`` per row."""
    return _uniform((batch_size, n), generator).argsort(dim=1)


class SyntheticTask(abc.ABC):
    """What every task offers. Subclasses are frozen dataclasses with (at least) the fields
    ``d_vocab`` (tokens lie in ``range(d_vocab)``, so a model needs ``cfg.d_vocab >= d_vocab``)
    and ``bos`` (prepend :data:`BOS_TOKEN`)."""

    name: ClassVar[str]
    d_vocab: int
    bos: bool

    @property
    def bos_token(self) -> int | None:
        """:data:`BOS_TOKEN` when ``bos`` is set, else None."""
        return BOS_TOKEN if self.bos else None

    @property
    def first_token(self) -> int:
        """The smallest content-token id: 1 with a BOS token, 0 without."""
        return 1 if self.bos else 0

    @property
    def n_content(self) -> int:
        """How many content-token ids there are: ``d_vocab - first_token``."""
        return self.d_vocab - self.first_token

    @property
    @abc.abstractmethod
    def seq_len(self) -> int:
        """Length of every sampled sequence, BOS included (a model needs ``n_ctx >= seq_len``)."""

    @property
    def max_accuracy(self) -> float:
        """The Bayes-optimal accuracy on masked positions (see the module docstring): 1.0 for a
        task whose rule determines every masked next token, the default; stochastic tasks
        override it."""
        return 1.0

    @property
    def min_loss(self) -> float:
        """The Bayes-optimal masked cross-entropy in nats: 0.0 for a deterministic rule, the
        default; stochastic tasks override it."""
        return 0.0

    @abc.abstractmethod
    def sample(self, batch_size: int, generator: torch.Generator) -> Batch:
        """Draw ``batch_size`` independent sequences using only ``generator``.

        Returns:
            a :class:`Batch` with ``tokens`` and ``mask`` of shape ``[batch_size, seq_len]``.
        """

    def metrics(
        self, logits: Float[Tensor, "batch pos d_vocab"], batch: Batch
    ) -> dict[str, float]:
        """``accuracy``, ``loss`` and ``n_predictions`` on masked positions (see
        :func:`masked_metrics`); some tasks add diagnostics. ``logits`` is ``[batch, pos, V]``
        with ``V >= d_vocab``."""
        _check_logits(logits, batch, self.d_vocab)
        return masked_metrics(logits, batch)

    def loss(self, logits: Float[Tensor, "batch pos d_vocab"], batch: Batch) -> Float[Tensor, ""]:
        """Differentiable masked cross-entropy (see :func:`masked_cross_entropy`)."""
        _check_logits(logits, batch, self.d_vocab)
        return masked_cross_entropy(logits, batch)

    def _check_common(self, min_content: int, why: str) -> None:
        _require_bool(self, "bos")
        _require_int(self, "d_vocab", self.first_token + min_content, why)


# ---------------------------------------------------------------------------------------------
# Tasks
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InductionTask(SyntheticTask):
    """Random tokens with one segment copied later, at a random offset and length per sequence.

    Generation, per sequence: a length ``L`` uniform in ``[min_length, max_length]``; a source
    start ``s`` and a copy start ``d`` uniform over all placements with ``s + L <= d`` and
    ``d + L <= seq_len`` (after the BOS token, if any); ``L`` distinct content tokens form the
    segment, written at ``s .. s+L-1`` and again at ``d .. d+L-1``. Every other position ("filler")
    is drawn independently and uniformly from the content tokens *not* in the segment. Offsets
    ``d - s``, lengths and places all vary, so neither position nor a fixed lag solves the task.

    Mask: ``t`` in ``d .. d+L-2``, from the first token of the copy to its second-to-last, so the
    predicted ``tokens[t + 1]`` runs over the copy's second to last tokens. At such ``t`` the current
    token ``A = tokens[t]`` occurs exactly once before ``t`` (at ``s + t - d``: segment tokens are
    distinct and never filler), and the token after that occurrence is ``tokens[t + 1]``. So
    induction (find the earlier ``A``, copy what followed it) is the unique rule and is always right
    there. The first token of the copy (``tokens[d]``) is not predictable and not masked.

    Perfect model: ``max_accuracy = 1.0``, ``min_loss = 0.0`` on masked positions (an ideal
    induction head, :func:`induction_accuracy`, scores 1.0). A model cannot tell the copy from a
    filler token that happens to repeat, where the rule fails; those positions are unmasked. Trained
    on all positions, the Bayes model therefore still puts the induction answer first at masked
    positions (accuracy 1) but hedges a little (loss above 0).

    Fields:
        d_vocab: token ids ``0 .. d_vocab-1`` (id 0 is BOS when ``bos``).
        seq_len: sequence length, BOS included.
        min_length: shortest copied segment, >= 2 (a length-1 copy has nothing to predict).
        max_length: longest segment; None means as long as fits:
            ``min((seq_len - bos) // 2, n_content - 1)`` (one content token is kept for filler).
        bos: put :data:`BOS_TOKEN` at position 0.

    ``Batch.info``: ``source_start``, ``copy_start``, ``length``, each ``[batch]``
    (offset = ``copy_start - source_start``).
    """

    name: ClassVar[str] = "induction"

    d_vocab: int = 64
    seq_len: int = 64
    min_length: int = 2
    max_length: int | None = None
    bos: bool = True

    def __post_init__(self) -> None:
        self._check_common(3, "a segment of 2 distinct tokens plus at least one filler token")
        first = self.first_token
        _require_int(self, "min_length", 2, "a copy of length 1 has no predictable position")
        _require_int(
            self,
            "seq_len",
            first + 2 * self.min_length,
            f"both copies of a min_length={self.min_length} segment must fit after the BOS token",
        )
        if self.min_length > self.n_content - 1:
            raise _fail(
                self,
                "min_length",
                self.min_length,
                f"it must be <= d_vocab - bos - 1 = {self.n_content - 1} (segment tokens are "
                "distinct and one content token is kept for filler); raise d_vocab",
            )
        fits = min((self.seq_len - first) // 2, self.n_content - 1)
        if self.max_length is None:
            object.__setattr__(self, "max_length", fits)
        _require_int(self, "max_length", self.min_length, "it must be at least min_length")
        if self.max_length > (self.seq_len - first) // 2:
            raise _fail(
                self,
                "max_length",
                self.max_length,
                f"it must be <= (seq_len - bos) // 2 = {(self.seq_len - first) // 2} so that "
                "both copies fit",
            )
        if self.max_length > self.n_content - 1:
            raise _fail(
                self,
                "max_length",
                self.max_length,
                f"it must be <= d_vocab - bos - 1 = {self.n_content - 1} (segment tokens are "
                "distinct and one content token is kept for filler)",
            )

    def sample(self, batch_size: int, generator: torch.Generator) -> Batch:
        _check_sample_args(batch_size, generator)
        b, n_pos, first, n = batch_size, self.seq_len, self.first_token, self.n_content
        assert self.max_length is not None  # resolved in __post_init__
        device = generator.device
        pos = torch.arange(n_pos, device=device)

        length = self.min_length + _randint(self.max_length - self.min_length + 1, (b,), generator)
        # Placements: with slack F = (free positions) - 2L, (gap before source, gap between the
        # copies) ranges over {(a, g): a, g >= 0, a + g <= F}, in bijection with pairs lo < hi
        # drawn from F + 2 values (a = lo, g = hi - lo - 1). Drawing the pair uniformly makes
        # the placement uniform.
        slack = n_pos - first - 2 * length
        i = _randint(slack + 2, (b,), generator)
        j = _randint(slack + 1, (b,), generator)
        j = j + (j >= i).long()
        lo, hi = torch.minimum(i, j), torch.maximum(i, j)
        src = first + lo
        dst = first + hi - 1 + length

        perm = _permutations(b, n, generator) + first  # [batch, n]: segment = perm[:, :L]
        # Filler: uniform over perm[:, L:], the content tokens not in the segment.
        filler_index = length[:, None] + _randint((n - length)[:, None], (b, n_pos), generator)
        tokens = perm.gather(1, filler_index)  # [batch, pos]
        for start in (src, dst):
            offset = pos[None, :] - start[:, None]  # [batch, pos]
            inside = (offset >= 0) & (offset < length[:, None])
            segment = perm.gather(1, offset.clamp(0, n - 1))
            tokens = torch.where(inside, segment, tokens)
        if self.bos:
            tokens[:, 0] = BOS_TOKEN
        mask = (pos[None, :] >= dst[:, None]) & (pos[None, :] <= (dst + length - 2)[:, None])
        info = {"source_start": src, "copy_start": dst, "length": length}
        return Batch(tokens=tokens, mask=mask, info=info)


@dataclass(frozen=True)
class RepeatedTokensTask(SyntheticTask):
    """The classic induction-score sequence: ``[BOS] r r ... r``, a random run ``r`` of
    ``run_length`` content tokens written ``n_repeats`` times.

    ``r`` is drawn uniformly with replacement (TransformerLens' convention), or without replacement
    when ``distinct`` is set. Mask: every ``t`` from the first token of the second run to the
    second-to-last position, i.e. where both ``tokens[t]`` and ``tokens[t + 1]`` are repeats and
    ``tokens[t + 1] == tokens[t + 1 - run_length]``: ``(n_repeats - 1) * run_length - 1``
    positions per sequence. The last token of the first run is not masked: the next token there
    is known only by counting positions, not by induction.

    Perfect model: ``max_accuracy = 1.0`` and ``min_loss = 0.0``: the mask and ``run_length`` are
    fixed, so copying the token ``run_length - 1`` positions back is always right. A pure induction
    head (copy what followed the current token's most recent earlier occurrence) is capped below
    that when ``r`` repeats a token with different successors; with ``distinct=True`` it also scores
    1.0. :func:`induction_accuracy` measures that cap on a batch.

    Fields:
        d_vocab: token ids ``0 .. d_vocab-1`` (id 0 is BOS when ``bos``).
        run_length: length of the random run, >= 2.
        n_repeats: how many times the run is written, >= 2.
        distinct: draw the run without replacement (needs ``run_length <= d_vocab - bos``).
        bos: put :data:`BOS_TOKEN` at position 0.

    ``seq_len`` = ``bos + run_length * n_repeats``. ``Batch.info`` is empty.
    """

    name: ClassVar[str] = "repeated_tokens"

    d_vocab: int = 64
    run_length: int = 32
    n_repeats: int = 2
    distinct: bool = False
    bos: bool = True

    def __post_init__(self) -> None:
        self._check_common(2, "at least two content tokens")
        _require_int(self, "run_length", 2, "a run of 1 token leaves nothing for induction")
        _require_int(self, "n_repeats", 2, "the run must be repeated at least once")
        _require_bool(self, "distinct")
        if self.distinct and self.run_length > self.n_content:
            raise _fail(
                self,
                "run_length",
                self.run_length,
                f"with distinct=True it must be <= d_vocab - bos = {self.n_content}",
            )

    @property
    def seq_len(self) -> int:
        return self.first_token + self.run_length * self.n_repeats

    def sample(self, batch_size: int, generator: torch.Generator) -> Batch:
        _check_sample_args(batch_size, generator)
        first, n = self.first_token, self.n_content
        if self.distinct:
            run = _permutations(batch_size, n, generator)[:, : self.run_length]
        else:
            run = _randint(n, (batch_size, self.run_length), generator)
        body = (run + first).repeat(1, self.n_repeats)  # [batch, run_length * n_repeats]
        if self.bos:
            bos = torch.full((batch_size, 1), BOS_TOKEN, dtype=torch.long, device=body.device)
            body = torch.cat([bos, body], dim=1)
        pos = torch.arange(self.seq_len, device=body.device)
        mask = (pos >= first + self.run_length) & (pos <= self.seq_len - 2)
        return Batch(tokens=body, mask=mask.expand(batch_size, -1).clone())


@dataclass(frozen=True)
class AssociativeRecallTask(SyntheticTask):
    """Key-value pairs, then queries: ``[BOS] k1 v1 k2 v2 ... kn vn q1 a1 ... qm am``.

    The content tokens are split in two: keys are the first ``n_content // 2`` content ids,
    values the rest (:attr:`key_tokens`, :attr:`value_tokens`), so no token is both. Per sequence
    the ``n_pairs`` keys are distinct (drawn without replacement), the values independent and
    uniform (they may repeat); the ``n_queries`` queries are distinct keys of the sequence, in
    random order, and each is followed by its value ``a = v_i`` for ``q = k_i``.

    Mask: the position of each query ``q``, whose next token is its value.

    Perfect model: ``max_accuracy = 1.0``, ``min_loss = 0.0``: keys are distinct, so every query has
    one value. Since each query key occurs exactly once before, an ideal induction head also scores
    1.0 (this is one-step induction with the first token of each pair as cue).

    Fields:
        d_vocab: token ids ``0 .. d_vocab-1`` (id 0 is BOS when ``bos``).
        n_pairs: key-value pairs per sequence, ``1 .. n_content // 2``.
        n_queries: queries per sequence, ``1 .. n_pairs``.
        bos: put :data:`BOS_TOKEN` at position 0.

    ``seq_len`` = ``bos + 2 * (n_pairs + n_queries)``. ``Batch.info``: ``keys`` and ``values``
    ``[batch, n_pairs]`` (in order), ``query_index`` ``[batch, n_queries]`` (which pair each query
    asks for).
    """

    name: ClassVar[str] = "associative_recall"

    d_vocab: int = 64
    n_pairs: int = 8
    n_queries: int = 1
    bos: bool = True

    def __post_init__(self) -> None:
        self._check_common(2, "at least one key token and one value token")
        _require_int(self, "n_pairs", 1, "there must be a pair to recall")
        if self.n_pairs > self.n_key_tokens:
            raise _fail(
                self,
                "n_pairs",
                self.n_pairs,
                f"it must be <= (d_vocab - bos) // 2 = {self.n_key_tokens}, the number of key "
                "tokens (keys are distinct); lower n_pairs or raise d_vocab",
            )
        _require_int(self, "n_queries", 1, "there must be a query")
        if self.n_queries > self.n_pairs:
            raise _fail(
                self,
                "n_queries",
                self.n_queries,
                f"it must be <= n_pairs = {self.n_pairs} (queries are distinct keys)",
            )

    @property
    def n_key_tokens(self) -> int:
        return self.n_content // 2

    @property
    def key_tokens(self) -> range:
        """The ids keys (and queries) are drawn from."""
        return range(self.first_token, self.first_token + self.n_key_tokens)

    @property
    def value_tokens(self) -> range:
        """The ids values are drawn from."""
        return range(self.first_token + self.n_key_tokens, self.d_vocab)

    @property
    def seq_len(self) -> int:
        return self.first_token + 2 * (self.n_pairs + self.n_queries)

    def sample(self, batch_size: int, generator: torch.Generator) -> Batch:
        _check_sample_args(batch_size, generator)
        b = batch_size
        keys = _permutations(b, self.n_key_tokens, generator)[:, : self.n_pairs]
        keys = keys + self.key_tokens.start
        values = _randint(len(self.value_tokens), (b, self.n_pairs), generator)
        values = values + self.value_tokens.start
        query_index = _permutations(b, self.n_pairs, generator)[:, : self.n_queries]
        queries = keys.gather(1, query_index)
        answers = values.gather(1, query_index)
        pairs = torch.stack([keys, values], dim=2).flatten(1)  # [batch, 2 * n_pairs]
        asked = torch.stack([queries, answers], dim=2).flatten(1)  # [batch, 2 * n_queries]
        parts = [pairs, asked]
        if self.bos:
            parts.insert(0, torch.full((b, 1), BOS_TOKEN, dtype=torch.long, device=keys.device))
        tokens = torch.cat(parts, dim=1)
        pos = torch.arange(self.seq_len, device=tokens.device)
        query_start = self.first_token + 2 * self.n_pairs
        mask = (pos >= query_start) & ((pos - query_start) % 2 == 0)
        info = {"keys": keys, "values": values, "query_index": query_index}
        return Batch(tokens=tokens, mask=mask.expand(b, -1).clone(), info=info)


@dataclass(frozen=True)
class MultiHopInductionTask(SyntheticTask):
    """Hop-k induction (Sanford et al., 2024, "Transformers, parallel computation, and
    logarithmic depth"): follow a chain of ``hops`` earlier occurrences.

    Definition (positions from 0). For a sequence ``x`` and position ``i``, let
    ``find(i) = max{ j <= i : x[j - 1] == x[i] }`` (the position just after the most recent earlier
    occurrence of ``x[i]``), ``find^1 = find`` and ``find^k(i) = find(find^(k-1)(i))``; then
    ``hop_k(x)[i] = x[find^k(i)]``. Hop 1 is ordinary induction: "what followed this token last
    time". Hop k repeats the step from the token it landed on, looking only further back.

    Generation, per sequence: ``[BOS] context q a`` where the context fills ``seq_len - bos - 2``
    positions. ``hops + 1`` distinct content tokens ``c_0 .. c_k`` form a chain; the context holds
    the ``k`` bigrams ``(c_{h-1}, c_h)``, placed at uniformly random non-overlapping places with
    the bigram for hop ``h + 1`` before the one for hop ``h`` (so each step looks further back), and
    filler tokens uniform over the content tokens not in the chain elsewhere. Then the query
    ``q = c_0`` and its answer ``a = c_k = hop_k(x)[seq_len - 2]``.

    Because chain tokens are distinct and never filler, every ``find`` in the chain has exactly
    one candidate, so "most recent" never has to break a tie and the answer is unambiguous.

    Mask: only the query position ``seq_len - 2``.

    Perfect model: ``max_accuracy = 1.0``, ``min_loss = 0.0``. A model that stops after ``h < k``
    hops answers ``c_h``, which is never right; :meth:`metrics` reports how often it does that
    (``predicts_hop_h``). An ideal one-hop induction head scores 0 for ``hops >= 2``.

    Fields:
        d_vocab: token ids ``0 .. d_vocab-1`` (id 0 is BOS when ``bos``).
        seq_len: sequence length, BOS included: at least ``bos + 2 * hops + 2``.
        hops: k >= 1.
        bos: put :data:`BOS_TOKEN` at position 0.

    ``Batch.info``: ``chain`` ``[batch, hops + 1]`` (``c_0 .. c_k``) and ``bigram_starts``
    ``[batch, hops]`` (position of each bigram's first token, in sequence order, which is the
    order of hops ``k, k-1, ..., 1``).
    """

    name: ClassVar[str] = "multi_hop"

    d_vocab: int = 64
    seq_len: int = 64
    hops: int = 2
    bos: bool = True

    def __post_init__(self) -> None:
        self._check_common(2, "at least two content tokens")
        _require_int(self, "hops", 1, "a chain needs at least one hop")
        _require_int(
            self,
            "seq_len",
            self.first_token + 2 * self.hops + 2,
            f"BOS, {self.hops} bigrams, the query and its answer must fit",
        )
        if self.hops + 2 > self.n_content:
            raise _fail(
                self,
                "hops",
                self.hops,
                f"it must be <= d_vocab - bos - 2 = {self.n_content - 2} (the chain's hops + 1 "
                "tokens are distinct and one content token is kept for filler)",
            )

    def sample(self, batch_size: int, generator: torch.Generator) -> Batch:
        _check_sample_args(batch_size, generator)
        b, k, n, first = batch_size, self.hops, self.n_content, self.first_token
        n_context = self.seq_len - first - 2

        perm = _permutations(b, n, generator) + first
        chain = perm[:, : k + 1]  # c_0 .. c_k
        filler_index = k + 1 + _randint(n - k - 1, (b, self.seq_len), generator)
        tokens = perm.gather(1, filler_index)  # [batch, pos]

        # k non-overlapping bigrams in n_context places: choose k sorted values from
        # range(n_context - k) and add m to the m-th (stars and bars), uniform over placements.
        cuts = _permutations(b, n_context - k, generator)[:, :k].sort(dim=1).values
        starts = first + cuts + torch.arange(k, device=cuts.device)  # [batch, k], increasing
        # Bigram m (m = 0 earliest) carries hop k - m: (c_{k-1-m}, c_{k-m}).
        reverse = chain.flip(1)  # reverse[:, m] = c_{k-m}
        bigram_tokens = torch.stack([reverse[:, 1:], reverse[:, :-1]], dim=2).flatten(1)
        bigram_pos = torch.stack([starts, starts + 1], dim=2).flatten(1)  # [batch, 2k]
        tokens.scatter_(1, bigram_pos, bigram_tokens)
        tokens[:, -2] = chain[:, 0]
        tokens[:, -1] = chain[:, k]
        if self.bos:
            tokens[:, 0] = BOS_TOKEN
        mask = torch.zeros_like(tokens, dtype=torch.bool)
        mask[:, -2] = True
        return Batch(tokens=tokens, mask=mask, info={"chain": chain, "bigram_starts": starts})

    def metrics(
        self, logits: Float[Tensor, "batch pos d_vocab"], batch: Batch
    ) -> dict[str, float]:
        """As :meth:`SyntheticTask.metrics`, plus ``predicts_hop_h`` for ``h = 1 .. hops - 1``:
        the fraction of queries answered with ``c_h``, the answer after only ``h`` hops (needs
        ``batch.info["chain"]``, as :meth:`sample` makes)."""
        out = super().metrics(logits, batch)
        chain = batch.info.get("chain")
        if chain is not None:
            guess = logits.detach()[:, -2].argmax(dim=-1)  # [batch]
            for h in range(1, self.hops):
                out[f"predicts_hop_{h}"] = float((guess == chain[:, h]).float().mean())
        return out


@dataclass(frozen=True, eq=False)
class NGramTable:
    """A sparse 3-gram transition table over content tokens.

    ``next_tokens[a, b]`` (token ids) and ``probs[a, b]`` (float64, summing to 1) list the
    ``support`` possible successors of the context ``(a + first_token, b + first_token)``, i.e.
    the first two axes index *content* tokens. Every other successor has probability 0.
    """

    next_tokens: Int[Tensor, "context_a context_b support"]
    probs: Float[Tensor, "context_a context_b support"]

    def dense(self, d_vocab: int) -> Float[Tensor, "context_a context_b d_vocab"]:
        """``p(next | a, b)`` over all ``d_vocab`` ids (content-indexed contexts)."""
        n = self.next_tokens.shape[0]
        out = torch.zeros(n, n, d_vocab, dtype=self.probs.dtype)
        return out.scatter_add_(2, self.next_tokens, self.probs)


@dataclass(frozen=True)
class NGramTask(SyntheticTask):
    """Text from a fixed random 3-gram model (paper Fig. 3): ``x[t] ~ p(. | x[t-2], x[t-1])``.

    The table is drawn once from ``table_seed`` (not from the sampling generator), so every batch
    of one task, on any machine, follows the same language: for every context ``(a, b)`` of content
    tokens, ``support`` distinct successors chosen uniformly, with probabilities drawn uniformly
    from the simplex (flat Dirichlet). The first two content tokens of a sequence are uniform;
    every later token follows the table.

    Mask: every ``t`` whose next token is generated by the table, i.e. ``tokens[t + 1]`` for
    content positions 2 onwards (``t >= bos + 1``).

    Perfect model: the Bayes-optimal predictor is the table itself (argmax of
    ``p(. | x[t-1], x[t])``). Its expected accuracy ``max_accuracy`` is the mean over masked
    positions of ``E[max_c p(c | context)]``, and ``min_loss`` the mean conditional entropy; both
    are computed exactly by propagating the distribution of the context pair through the sequence
    (the first contexts are uniform, later ones follow the chain). ``support = 1`` makes the text
    deterministic (ceiling 1.0). :meth:`bayes_logits` gives the optimal predictor's log-probs.

    Fields:
        d_vocab: token ids ``0 .. d_vocab-1`` (id 0 is BOS when ``bos``). The table holds
            ``n_content**2 * support`` entries.
        seq_len: sequence length, BOS included, at least ``bos + 3``.
        support: successors per context, ``1 .. d_vocab - bos`` (smaller is sparser, more
            predictable).
        table_seed: seed of the transition table.
        bos: put :data:`BOS_TOKEN` at position 0.

    ``Batch.info`` is empty.
    """

    name: ClassVar[str] = "ngram"

    d_vocab: int = 64
    seq_len: int = 64
    support: int = 4
    table_seed: int = 0
    bos: bool = False

    def __post_init__(self) -> None:
        self._check_common(2, "at least two content tokens")
        _require_int(self, "seq_len", self.first_token + 3, "two context tokens and one to predict")
        _require_int(self, "support", 1, "every context needs a successor")
        if self.support > self.n_content:
            raise _fail(
                self,
                "support",
                self.support,
                f"it must be <= d_vocab - bos = {self.n_content} (successors are distinct "
                "content tokens)",
            )
        _require_int(self, "table_seed", 0, "torch seeds are non-negative")

    @cached_property
    def table(self) -> NGramTable:
        """The transition table, drawn from ``table_seed`` on first use (CPU, float64)."""
        gen = torch.Generator().manual_seed(self.table_seed)
        n, k = self.n_content, self.support
        n_ctx = n * n
        # Floyd's algorithm, vectorised over contexts: a uniform k-subset of range(n) in k steps.
        chosen = torch.empty(n_ctx, k, dtype=torch.long)
        for step, top in enumerate(range(n - k, n)):
            pick = _randint(top + 1, (n_ctx,), gen)
            seen = (chosen[:, :step] == pick[:, None]).any(dim=1)
            chosen[:, step] = torch.where(seen, torch.full_like(pick, top), pick)
        # Flat Dirichlet: normalised Exp(1) draws.
        weights = (-torch.log1p(-_uniform((n_ctx, k), gen))).clamp_min(1e-12)
        probs = weights / weights.sum(dim=1, keepdim=True)
        return NGramTable(
            next_tokens=(chosen + self.first_token).view(n, n, k),
            probs=probs.view(n, n, k),
        )

    @cached_property
    def _ceilings(self) -> tuple[float, float]:
        n, first = self.n_content, self.first_token
        table = self.table
        best = table.probs.max(dim=2).values  # [a, b]
        entropy = -(table.probs * table.probs.log()).sum(dim=2)
        pair = torch.full((n, n), 1.0 / (n * n), dtype=torch.float64)  # P(x[t-1], x[t])
        successor_index = (
            torch.arange(n)[None, :, None] * n + (table.next_tokens - first)
        ).flatten()  # the pair (b, c) that the context (a, b) moves to
        n_predicted = self.seq_len - first - 2
        accuracy = loss = 0.0
        for step in range(n_predicted):
            accuracy += float((pair * best).sum())
            loss += float((pair * entropy).sum())
            if step + 1 < n_predicted:
                flow = (pair[:, :, None] * table.probs).flatten()
                pair = torch.zeros(n * n, dtype=torch.float64).index_add_(
                    0, successor_index, flow
                ).view(n, n)
        return accuracy / n_predicted, loss / n_predicted

    @property
    def max_accuracy(self) -> float:
        return self._ceilings[0]

    @property
    def min_loss(self) -> float:
        return self._ceilings[1]

    def sample(self, batch_size: int, generator: torch.Generator) -> Batch:
        _check_sample_args(batch_size, generator)
        b, first, n = batch_size, self.first_token, self.n_content
        device = generator.device
        next_tokens = self.table.next_tokens.to(device)
        cdf = self.table.probs.cumsum(dim=2).to(device)
        n_body = self.seq_len - first
        body = torch.empty(b, n_body, dtype=torch.long, device=device)
        body[:, :2] = _randint(n, (b, 2), generator)  # content indices
        draws = _uniform((b, n_body), generator)
        rows = torch.arange(b, device=device)
        for t in range(2, n_body):
            a, c = body[:, t - 2], body[:, t - 1]
            choice = (cdf[a, c] <= draws[:, t, None]).sum(dim=1).clamp(max=self.support - 1)
            body[:, t] = next_tokens[a, c][rows, choice] - first
        tokens = body + first
        if self.bos:
            bos = torch.full((b, 1), BOS_TOKEN, dtype=torch.long, device=device)
            tokens = torch.cat([bos, tokens], dim=1)
        pos = torch.arange(self.seq_len, device=device)
        mask = (pos >= first + 1) & (pos <= self.seq_len - 2)
        return Batch(tokens=tokens, mask=mask.expand(b, -1).clone())

    def bayes_logits(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_vocab"]:
        """Log-probabilities of the Bayes-optimal predictor: ``log p(. | tokens[t-1], tokens[t])``
        at every ``t >= bos + 1`` (``-inf`` for impossible successors); zeros (uniform) before.
        Scored with :meth:`metrics`, it approaches ``max_accuracy`` and ``min_loss``."""
        first = self.first_token
        b, n_pos = tokens.shape
        dense = self.table.dense(self.d_vocab).to(tokens.device)  # [a, b, d_vocab]
        out = torch.zeros(b, n_pos, self.d_vocab, dtype=torch.float64, device=tokens.device)
        a = (tokens[:, first : n_pos - 1] - first).clamp(0, self.n_content - 1)
        c = (tokens[:, first + 1 :] - first).clamp(0, self.n_content - 1)
        out[:, first + 1 :] = dense[a, c].log()
        return out


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------

TASKS: dict[str, type[SyntheticTask]] = {
    cls.name: cls
    for cls in (
        InductionTask,
        RepeatedTokensTask,
        AssociativeRecallTask,
        MultiHopInductionTask,
        NGramTask,
    )
}
"""Every task class by its name."""


def make_task(name: str, **kwargs: Any) -> SyntheticTask:
    """Build the task called ``name`` (a key of :data:`TASKS`) with parameters ``kwargs``.

    Raises:
        ValueError: for an unknown name or parameter (the message lists the valid ones), or a bad
            parameter value (the message names the field).
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; the tasks are: {', '.join(sorted(TASKS))}")
    cls = TASKS[name]
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(kwargs) - set(known))
    if unknown:
        raise ValueError(
            f"task {name!r} has no parameter {', '.join(map(repr, unknown))}; "
            f"its parameters are: {', '.join(known)}"
        )
    return cls(**kwargs)


__all__ = [
    "BOS_TOKEN",
    "IGNORE_INDEX",
    "TASKS",
    "AssociativeRecallTask",
    "Batch",
    "InductionTask",
    "MultiHopInductionTask",
    "NGramTable",
    "NGramTask",
    "RepeatedTokensTask",
    "SyntheticTask",
    "induction_accuracy",
    "induction_predictions",
    "make_task",
    "masked_cross_entropy",
    "masked_metrics",
]
