"""Fine-tune only the shift coefficients of a (retrofitted) model through the ordinary trainer.

:func:`freeze_all_but_shift` turns ``requires_grad`` off for every parameter except the shift
coefficients (``blocks.{l}.attn.shift_{q,k,v}``); the trainer's optimiser only receives parameters
that require gradients, so the frozen weights stay bit-identical while the coefficients train.
:func:`spec_for_model` builds the :class:`~kvshift_lens.train.RunSpec` that
``train(spec, run_dir, model=model)`` expects, with ``spec.model`` equal to the model's config.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from kvshift_lens.shift import is_shift_parameter
from kvshift_lens.train.config import RunSpec, TrainConfig

__all__ = ["freeze_all_but_shift", "is_shift_parameter", "spec_for_model", "unfreeze_all"]


def freeze_all_but_shift(model: nn.Module) -> list[str]:
    """Freeze every parameter except the shift coefficients; return the names left trainable.

    Raises:
        ValueError: the model has no shift coefficients (it was built with the shift off).
    """
    trainable = []
    for name, p in model.named_parameters():
        keep = is_shift_parameter(name)
        p.requires_grad_(keep)
        if keep:
            trainable.append(name)
    if not trainable:
        raise ValueError(
            "the model has no shift coefficients to train (every shift_q/k/v is off); build or "
            "convert it with the shift on, e.g. from_hf(..., shift=('k', 'v'))")
    return trainable


def unfreeze_all(model: nn.Module) -> None:
    """Undo :func:`freeze_all_but_shift`: every parameter requires gradients again."""
    for p in model.parameters():
        p.requires_grad_(True)


def spec_for_model(model: Any, task: dict[str, Any], train: TrainConfig | None = None) -> RunSpec:
    """A run spec for training ``model`` itself: ``spec.model`` is ``model.cfg.to_dict()``."""
    return RunSpec(model=model.cfg.to_dict(), task=dict(task), train=train or TrainConfig())
