"""The zoo's names, folders, specs and cards: what :mod:`kvshift_lens.zoo` and
:meth:`kvshift_lens.model.HookedKVShiftTransformer.from_pretrained` look models up in. Imports
nothing of kvshift_lens (the model's loader calls it)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ZOO_DIR = Path(__file__).resolve().parent
EXPORT_DTYPE = "float16"
"""The dtype the zoo stores weights in (float16 keeps 3 more mantissa bits than bfloat16, and the
weights of these small models are far inside its range)."""
TRAIN_INFO = "zoo_train.json"
"""Written into a run folder by the builder after training: wall time, machine, threads."""
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


def build_command(name: str) -> str:
    """The documented command that rebuilds ``name`` (its weights and its card)."""
    return f"python -m kvshift_lens.zoo build {name} --out runs/zoo"


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


__all__ = ["CARD_FILE", "CARD_MD", "EXPORT_DTYPE", "MODELS_DIR", "SPECS_DIR", "TOKENIZER_FILE",
           "TRAIN_INFO", "ModelCard", "build_command", "is_zoo_name", "list_models", "model_card",
           "model_dir", "spec"]
