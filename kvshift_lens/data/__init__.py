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

# Text corpora (:mod:`.text`): the embedded stdlib corpus, local files, a document-level
# train/validation split, byte-level and locally trained BPE tokenizers, and TextTask.
# (load_tokenizer / save_tokenizer are kvshift_lens.tokenizer's, re-exported.)
from kvshift_lens.data.text import (  # noqa: E402
    DEFAULT_CHUNK_CHARS,
    CorpusDependencyError,
    CorpusError,
    CorpusNotFoundError,
    CorpusUnavailableError,
    Document,
    TextTask,
    chunk_documents,
    encode_documents,
    is_validation,
    load_corpus,
    load_documents,
    load_tokenizer,
    resolve_tokenizer,
    save_tokenizer,
    split_documents,
    stdlib_corpus_files,
    stdlib_root,
    train_bpe_tokenizer,
    validation_score,
)

__all__ += [
    "DEFAULT_CHUNK_CHARS",
    "CorpusDependencyError",
    "CorpusError",
    "CorpusNotFoundError",
    "CorpusUnavailableError",
    "Document",
    "TextTask",
    "chunk_documents",
    "encode_documents",
    "is_validation",
    "load_corpus",
    "load_documents",
    "load_tokenizer",
    "resolve_tokenizer",
    "save_tokenizer",
    "split_documents",
    "stdlib_corpus_files",
    "stdlib_root",
    "train_bpe_tokenizer",
    "validation_score",
]
