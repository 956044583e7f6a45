"""Circuit probes for models that meet TransformerLens 4's protocol, with shift-aware extensions.

Probes read models through TransformerLens hooks and, where present, the model's coefficient API
(``model.shift_coefficients()``); they never import ``kvshift_lens``.

- :mod:`probes.scores`: previous-token, duplicate-token, induction, prefix-matching, copying and
  in-context-learning scores, on the plain pattern or the effective (source) pattern.
- :mod:`probes.effective`: the effective source pattern of a shifted head (values and keys).
- :mod:`probes.taxonomy`: head classification from scores and coefficients.
"""

from probes.effective import effective_key_sources, effective_pattern, key_source_weights
from probes.scores import (
    HeadScores,
    SourcePatterns,
    copying_scores,
    duplicate_token_scores,
    head_scores,
    in_context_learning_score,
    induction_scores,
    prefix_matching_scores,
    previous_token_scores,
    repeated_random_tokens,
    source_patterns,
)
from probes.taxonomy import (
    DUPLICATE_TOKEN_THRESHOLD,
    INDUCTION_THRESHOLD,
    KEY_SHIFT_THRESHOLD,
    PREVIOUS_TOKEN_THRESHOLD,
    HeadClass,
    HeadKind,
    HeadTaxonomy,
    classify_from_scores,
    classify_heads,
)

__all__ = [
    "DUPLICATE_TOKEN_THRESHOLD",
    "INDUCTION_THRESHOLD",
    "KEY_SHIFT_THRESHOLD",
    "PREVIOUS_TOKEN_THRESHOLD",
    "HeadClass",
    "HeadKind",
    "HeadScores",
    "HeadTaxonomy",
    "SourcePatterns",
    "classify_from_scores",
    "classify_heads",
    "copying_scores",
    "duplicate_token_scores",
    "effective_key_sources",
    "effective_pattern",
    "head_scores",
    "in_context_learning_score",
    "induction_scores",
    "key_source_weights",
    "prefix_matching_scores",
    "previous_token_scores",
    "repeated_random_tokens",
    "source_patterns",
]
