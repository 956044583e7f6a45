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

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from kvshift_lens.model import HookedKVShiftTransformer

ZOO_DIR = Path(__file__).resolve().parent
MODELS_DIR = ZOO_DIR / "models"
SPECS_DIR = ZOO_DIR / "specs"
TOKENIZER_FILE = ZOO_DIR / "tokenizer.json"
CARD_FILE = "card.json"
CARD_MD = "card.md"


def list_models() -> list[str]:
    """The names of the models that have a spec, sorted."""
    return sorted(p.stem for p in SPECS_DIR.glob("*.json"))


def _check_name(name: Any) -> str:
    names = list_models()
    if not isinstance(name, str) or name not in names:
        raise ValueError(f"unknown zoo model {name!r}; the zoo has {names}")
    return name


def is_zoo_name(name: Any) -> bool:
    """Whether ``name`` is the name of a zoo model."""
    return isinstance(name, str) and name in list_models()


def spec(name: str) -> dict[str, Any]:
    """The run spec of model ``name`` (``specs/<name>.json``), its task's tokenizer made an
    absolute path to the zoo's ``tokenizer.json``: a dict for :func:`kvshift_lens.train.train`.

    Raises:
        ValueError: ``name`` is not a zoo model (the message lists them).
    """
    d = json.loads((SPECS_DIR / f"{_check_name(name)}.json").read_text())
    tok = d["task"].get("tokenizer")
    if isinstance(tok, str) and tok == TOKENIZER_FILE.name:
        d["task"]["tokenizer"] = str(TOKENIZER_FILE)
    return d


def model_dir(name: str) -> Path:
    """The folder of model ``name``'s shipped checkpoint.

    Raises:
        ValueError: ``name`` is not a zoo model.
        FileNotFoundError: it has a spec but no shipped weights (build it:
            ``python -m kvshift_lens.zoo build NAME``).
    """
    folder = MODELS_DIR / _check_name(name)
    if not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"zoo model {name!r} has no weights in {folder}; build them with "
            f"`python -m kvshift_lens.zoo build {name}`")
    return folder


@dataclass(frozen=True)
class ModelCard:
    """What a zoo model is and what was measured on it (``card.json``).

    Attributes:
        name: the zoo name.
        data: the corpus, its split and the tokenizer, in words.
        n_layers, d_model, n_heads, d_head, d_mlp, attn_only, shift: the shape (``shift``: whether
            keys and values are shifted).
        n_params: parameter count.
        steps, tokens_seen: the training budget (``tokens_seen = steps * batch_size * seq_len``).
        wall_seconds: training wall time (the machine is in ``train_machine``).
        command: the command that rebuilds the model and this card.
        val_loss: mean next-token loss on the fixed validation windows (``val_windows`` windows).
        metrics: every other measured number (repeated-token losses, head scores, roles; see
            :mod:`kvshift_lens.zoo.card`).
        raw: the whole ``card.json``.
    """

    name: str
    data: str
    n_layers: int
    d_model: int
    n_heads: int
    d_head: int
    d_mlp: int | None
    attn_only: bool
    shift: bool
    n_params: int
    steps: int
    tokens_seen: int
    wall_seconds: float
    command: str
    val_loss: float
    metrics: dict[str, Any] = field(repr=False, default_factory=dict)
    raw: dict[str, Any] = field(repr=False, default_factory=dict)

    @property
    def roles(self) -> dict[str, str]:
        """``{"L0H1": kind, ...}``: every head's role from :func:`probes.classify_heads`."""
        return {h["head"]: h["kind"] for h in self.metrics.get("heads", [])}


def model_card(name: str) -> ModelCard:
    """The card of model ``name`` (``models/<name>/card.json``).

    Raises:
        ValueError: ``name`` is not a zoo model.
        FileNotFoundError: the model has not been built.
    """
    raw = json.loads((model_dir(name) / CARD_FILE).read_text())
    keys = {f for f in ModelCard.__dataclass_fields__ if f not in ("metrics", "raw")}
    return ModelCard(**{k: raw[k] for k in keys}, metrics=raw.get("metrics", {}), raw=raw)


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


__all__ = ["MODELS_DIR", "SPECS_DIR", "TOKENIZER_FILE", "ModelCard", "is_zoo_name", "list_models",
           "load", "model_card", "model_dir", "spec"]
