"""Checkpoints: a folder with ``config.json`` and ``model.safetensors`` (never pickle).

``config.json`` = ``{"format": "kvshift_lens", "format_version": 1, "config": {...}}``. A tokenizer,
when the model has one, goes beside them (``tokenizer.json``, or a Hugging Face tokenizer's own
files). Files are written to temporary names and renamed into place, so an interrupted save never
leaves a half-written checkpoint under the real names.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from kvshift_lens.config import KVShiftConfig

if TYPE_CHECKING:
    from kvshift_lens.model import HookedKVShiftTransformer

FORMAT = "kvshift_lens"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"


class CheckpointError(ValueError):
    """A checkpoint folder is missing, incomplete, corrupt or does not match its config."""


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_pretrained(model: HookedKVShiftTransformer, directory: str | os.PathLike) -> Path:
    """Write ``model`` to ``directory`` (created if needed). Returns the folder."""
    out = Path(directory)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    _atomic_write(out / WEIGHTS_FILE, lambda p: save_file(
        tensors, p, metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)}))
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": model.cfg.to_dict()}
    _atomic_write(out / CONFIG_FILE,
                  lambda p: Path(p).write_text(json.dumps(meta, indent=2, sort_keys=True)))
    tok = model.tokenizer
    if tok is not None:
        if hasattr(tok, "save_pretrained"):
            tok.save_pretrained(str(out))
        else:
            _atomic_write(out / TOKENIZER_FILE, lambda p: tok.save(p))
    return out


def load_config(directory: str | os.PathLike) -> KVShiftConfig:
    """Read and validate ``config.json`` of a checkpoint folder."""
    path = Path(directory) / CONFIG_FILE
    if not Path(directory).is_dir():
        raise CheckpointError(f"checkpoint folder {directory} does not exist")
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: not a kvshift_lens checkpoint folder")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a {FORMAT} config (no \"format\": \"{FORMAT}\")")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format_version={version!r}; this kvshift_lens reads version "
            f"{FORMAT_VERSION}"
        )
    try:
        return KVShiftConfig.from_dict(meta.get("config"))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: invalid config: {e}") from None


def load_pretrained(directory: str | os.PathLike, device: str | None = None):
    """Load a checkpoint folder written by :func:`save_pretrained`."""
    from kvshift_lens.model import HookedKVShiftTransformer

    folder = Path(directory)
    cfg = load_config(folder)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{weights} is missing")
    try:
        state = load_file(weights)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights} is corrupt or not a safetensors file ({e})") from None
    cfg.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = HookedKVShiftTransformer(cfg, tokenizer=_load_tokenizer(folder))
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{weights} does not match its config: missing {missing[:8]}"
            f"{'...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
            f"{'...' if len(unexpected) > 8 else ''}"
        )
    for k, v in state.items():
        if v.shape != expected[k].shape:
            raise CheckpointError(
                f"{weights}: tensor {k} has shape {tuple(v.shape)}, config expects "
                f"{tuple(expected[k].shape)}"
            )
        if v.dtype != expected[k].dtype:
            raise CheckpointError(
                f"{weights}: tensor {k} has dtype {v.dtype}, config says {expected[k].dtype}")
    model.load_state_dict(state)
    return model


def _load_tokenizer(folder: Path):
    if (folder / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    if (folder / TOKENIZER_FILE).is_file():
        from tokenizers import Tokenizer

        try:
            return Tokenizer.from_file(str(folder / TOKENIZER_FILE))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise CheckpointError(f"{folder / TOKENIZER_FILE} is not a valid tokenizer ({e})") \
                from None
    return None
