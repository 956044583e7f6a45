"""Data for training and probing: synthetic tasks generated on the fly (:mod:`.tasks`).

Each task is a frozen dataclass with ``sample(batch_size, generator) -> Batch``,
``metrics(logits, batch)``, ``max_accuracy`` and ``min_loss``; :func:`make_task` builds one by
name from :data:`TASKS`.
"""

from kvshift_lens.data.tasks import (
    BOS_TOKEN,
    IGNORE_INDEX,
    TASKS,
    AssociativeRecallTask,
    Batch,
    InductionTask,
    MultiHopInductionTask,
    NGramTable,
    NGramTask,
    RepeatedTokensTask,
    SyntheticTask,
    induction_accuracy,
    induction_predictions,
    make_task,
    masked_cross_entropy,
    masked_metrics,
)

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
