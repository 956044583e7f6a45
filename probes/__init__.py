"""Circuit probes for models that meet TransformerLens 4's protocol, with shift-aware extensions.

Probes read models through TransformerLens hooks and, where present, the model's coefficient API
(``model.shift_coefficients()``); they never import ``kvshift_lens``.

- :mod:`probes.scores`: previous-token, duplicate-token, induction, prefix-matching, copying and
  in-context-learning scores, on the plain pattern or the effective (source) pattern.
- :mod:`probes.effective`: the effective source pattern of a shifted head (values and keys).
- :mod:`probes.taxonomy`: head classification from scores and coefficients.
- :mod:`probes.ablation`: zero / mean head ablations and removing a head's key or value shift,
  all through hooks, with their effect on the task's loss and accuracy.
- :mod:`probes.patching`: activation patching over full hook names (the shift hooks and the
  coefficients included).
- :mod:`probes.linear`: linear probes for the previous token's identity.
- :mod:`probes.composition`: Q/K/V composition scores with a random baseline (vanilla models).
- :mod:`probes.circuits`: shift-aware circuit maths: per-lag QK / OV and full circuits, an exact
  per-component, per-lag decomposition of attention scores, composition scores split by lag.
- :mod:`probes.attribution`: attribution patching (gradient x activation difference) over any hook
  set, per head and position, from two passes; comparison with exact patching.
- :mod:`probes.eap`: edge attribution patching (EAP, EAP-IG) over a component graph whose shifted
  heads have separate own-position and shift (previous-position K/V) ports; circuits and their
  faithfulness.
"""

from probes.ablation import (
    Ablation,
    AblationEffect,
    AblationTable,
    ablate_each_head,
    ablate_each_shift,
    ablation_effect,
    head_means,
    mean_ablate_head,
    remove_key_shift,
    remove_shift,
    remove_value_shift,
    zero_ablate_head,
)
from probes.attribution import (
    Agreement,
    AttributionResult,
    agreement,
    attribution_patch,
    exact_patching_effects,
    logprob_metric,
)
from probes.circuits import (
    LaggedComposition,
    LaggedOV,
    LaggedQK,
    ScoreDecomposition,
    decompose_attn_scores,
    full_ov_circuit,
    full_qk_circuit,
    lagged_composition_scores,
    lagged_ov_circuit,
    lagged_qk_circuit,
)
from probes.composition import (
    CompositionResult,
    all_composition_scores,
    composition_report,
    composition_scores_from_weights,
    random_composition_baseline,
)
from probes.eap import (
    Circuit,
    CircuitRunner,
    ComponentGraph,
    Edge,
    EdgeScores,
    Faithfulness,
    edge_attribution,
    faithfulness,
)
from probes.effective import effective_key_sources, effective_pattern, key_source_weights
from probes.linear import ProbeResult, default_sites, fit_logistic, previous_token_probe
from probes.patching import NamePatchResult, patch_by_name, run_with_patches
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
    "Ablation",
    "AblationEffect",
    "AblationTable",
    "CompositionResult",
    "NamePatchResult",
    "ProbeResult",
    "ablate_each_head",
    "ablate_each_shift",
    "ablation_effect",
    "all_composition_scores",
    "composition_report",
    "composition_scores_from_weights",
    "default_sites",
    "fit_logistic",
    "head_means",
    "mean_ablate_head",
    "patch_by_name",
    "previous_token_probe",
    "random_composition_baseline",
    "remove_key_shift",
    "remove_shift",
    "remove_value_shift",
    "run_with_patches",
    "zero_ablate_head",
    "LaggedComposition",
    "LaggedOV",
    "LaggedQK",
    "ScoreDecomposition",
    "decompose_attn_scores",
    "full_ov_circuit",
    "full_qk_circuit",
    "lagged_composition_scores",
    "lagged_ov_circuit",
    "lagged_qk_circuit",
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
    "Agreement",
    "AttributionResult",
    "Circuit",
    "CircuitRunner",
    "ComponentGraph",
    "Edge",
    "EdgeScores",
    "Faithfulness",
    "agreement",
    "attribution_patch",
    "edge_attribution",
    "exact_patching_effects",
    "faithfulness",
    "logprob_metric",
]
