"""Training: one trainer for synthetic tasks and text (:func:`train`), its settings
(:class:`TrainConfig`, :class:`RunSpec`), resumable checkpoints and data parallelism."""

from kvshift_lens.train.config import RunSpec, TrainConfig
from kvshift_lens.train.trainer import (
    RunFolderError,
    TrainingDiverged,
    TrainResult,
    lr_lambda,
    train,
)

__all__ = ["RunFolderError", "RunSpec", "TrainConfig", "TrainResult", "TrainingDiverged",
           "lr_lambda", "train"]
