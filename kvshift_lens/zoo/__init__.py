"""A zoo of small language models trained on the embedded standard-library corpus, loadable by
name and offline: ``HookedKVShiftTransformer.from_pretrained("kvshift-attn-1l")`` or
:func:`load`.

Every model pairs a KV-shift variant with a vanilla one of the same shape, trained with the
project's trainer (:mod:`kvshift_lens.train`) on the same tokens (the same spec but for the shift
settings), with one shared byte-level BPE tokenizer (``tokenizer.json`` in this folder, trained
once on the corpus's training split). Each model folder under ``models/<name>/`` is an ordinary
checkpoint (:meth:`~kvshift_lens.model.HookedKVShiftTransformer.save_pretrained`) stored in
float16, plus ``card.json`` (numbers measured by :mod:`kvshift_lens.zoo.card`) and ``card.md``.

The spec of each model is ``specs/<name>.json``: a complete run spec (every model, task and
training setting). Its task's ``tokenizer`` is the file name ``tokenizer.json``, relative to this
folder; :func:`spec` returns it with that path made absolute, ready for
:func:`kvshift_lens.train.train`. One command rebuilds a model, its weights and its card::

    python -m kvshift_lens.zoo build kvshift-attn-1l --out runs/zoo

This module imports nothing of :mod:`kvshift_lens.train` (the builder, :mod:`kvshift_lens.zoo.build`,
does, when run) and nothing above the model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvshift_lens.zoo.registry import (
    CARD_FILE,
    CARD_MD,
    EXPORT_DTYPE,
    MODELS_DIR,
    SPECS_DIR,
    TOKENIZER_FILE,
    TRAIN_INFO,
    ModelCard,
    build_command,
    is_zoo_name,
    list_models,
    model_card,
    model_dir,
    spec,
)

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from kvshift_lens.model import HookedKVShiftTransformer


def load(
    name: str, device: str | None = None, dtype: torch.dtype | None = None
) -> HookedKVShiftTransformer:
    """Load zoo model ``name`` with its tokenizer, offline, in eval mode.

    Args:
        name: a name from :func:`list_models`.
        device: where to put it (default: CUDA when available, else CPU).
        dtype: the weights' dtype (default float32; the stored weights are float16).

    Raises:
        ValueError: ``name`` is not a zoo model (the message lists them).
        FileNotFoundError: it has not been built.
    """
    import torch

    from kvshift_lens.model import HookedKVShiftTransformer

    model = HookedKVShiftTransformer.from_pretrained(model_dir(name), device=device)
    return model.to(torch.float32 if dtype is None else dtype)


__all__ = ["CARD_FILE", "CARD_MD", "EXPORT_DTYPE", "MODELS_DIR", "SPECS_DIR", "TOKENIZER_FILE",
           "TRAIN_INFO", "ModelCard", "build_command", "is_zoo_name", "list_models", "load",
           "model_card", "model_dir", "spec"]
