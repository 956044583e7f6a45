"""Training: one trainer for synthetic tasks and text (:func:`train`), its settings
(:class:`TrainConfig`, :class:`RunSpec`, resolved once by :func:`resolve_run_spec`), evaluation,
resumable checkpoints, data parallelism and sweeps.

Names are imported on first use: ``TrainConfig`` and ``RunSpec`` load no torch (the command line
builds its flags from them); the trainer does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvshift_lens._lazy import lazy_exports

_EXPORTS = {
    "RunSpec": "kvshift_lens.train.config",
    "TrainConfig": "kvshift_lens.train.config",
    "ResolvedRun": "kvshift_lens.train.config",
    "resolve_run_spec": "kvshift_lens.train.config",
    "RunFolderError": "kvshift_lens.run_folder",
    "TrainingDiverged": "kvshift_lens.train.trainer",
    "TrainResult": "kvshift_lens.train.trainer",
    "lr_lambda": "kvshift_lens.train.trainer",
    "train": "kvshift_lens.train.trainer",
    "evaluate": "kvshift_lens.train.evaluation",
}

__all__ = [
    "ResolvedRun",
    "RunFolderError",
    "RunSpec",
    "TrainConfig",
    "TrainResult",
    "TrainingDiverged",
    "evaluate",
    "lr_lambda",
    "resolve_run_spec",
    "train",
]

if TYPE_CHECKING:  # pragma: no cover
    from kvshift_lens.run_folder import RunFolderError
    from kvshift_lens.train.config import ResolvedRun, RunSpec, TrainConfig, resolve_run_spec
    from kvshift_lens.train.evaluation import evaluate
    from kvshift_lens.train.trainer import TrainingDiverged, TrainResult, lr_lambda, train


__getattr__, __dir__ = lazy_exports('kvshift_lens.train', _EXPORTS, globals())
