"""Checkpoints: a folder with ``config.json`` and ``model.safetensors`` (never pickle).

``config.json`` = ``{"format": "kvshift_lens", "format_version": 1, "weights_sha256": ...,
"tokenizer_files": {name: sha256}, "config": {...}}``. A tokenizer, when the model has one, goes
beside them (``tokenizer.json`` and ``tokenizer_config.json``, as Hugging Face writes them).

Guarantees:

- **Atomic**: every file is first written to a temporary name beside its target and flushed; only
  when all of them are written are they renamed into place, the config last. A save that fails
  part-way (a full disk, an exception) leaves the previous checkpoint untouched and no temporary
  file behind.
- **Checked**: ``weights_sha256`` is the SHA-256 of ``model.safetensors`` as written (and
  ``tokenizer_files`` those of the tokenizer's files). Loading verifies them, so a bit flip, a
  truncated copy or a save killed between two renames is refused with :class:`CheckpointError`
  instead of loading wrong numbers; so are weights holding NaN or inf (``allow_nonfinite=True``
  loads them anyway, for forensics), tensors whose names, shapes or dtypes do not match the
  config, and folders whose tokenizer would run code.

This module knows the file format and the config, not the model class: the model's
``from_pretrained`` reads a checkpoint through :func:`read_checkpoint` and builds itself.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from kvshift_lens._files import (
    commit_staged,
    discard_staged,
    sha256_file,
    temp_path_for,
    write_staged,
)
from kvshift_lens.config import KVShiftConfig
from kvshift_lens.tokenizer import TOKENIZER_FILES, load_tokenizer, save_tokenizer

FORMAT = "kvshift_lens"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint folder is missing, incomplete, corrupt or does not match its config."""


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def _stage_tokenizer(tokenizer: Any, out: Path) -> dict[Path, Path]:
    """Write the tokenizer's files (:func:`~kvshift_lens.tokenizer.save_tokenizer`) into a
    scratch folder inside ``out``, then move each beside its target under a temporary name:
    ``{target: staged temporary file}``."""
    scratch = Path(tempfile.mkdtemp(dir=out, prefix=".tokenizer.", suffix=".tmp"))
    staged: dict[Path, Path] = {}
    try:
        save_tokenizer(tokenizer, scratch)
        for f in sorted(scratch.iterdir()):
            target = out / f.name
            tmp = temp_path_for(target)
            os.replace(f, tmp)
            staged[target] = tmp
    except BaseException:
        discard_staged(staged)
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return staged


def save_checkpoint_files(
    directory: str | os.PathLike,
    state_dict: Mapping[str, torch.Tensor],
    config: KVShiftConfig,
    tokenizer: Any = None,
) -> Path:
    """Write a checkpoint folder (see the module docstring); returns the folder.

    Raises:
        CheckpointError: ``directory`` exists and is not a folder.
    """
    out = Path(directory)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    staged: dict[Path, Path] = {}
    try:
        if tokenizer is not None:
            staged.update(_stage_tokenizer(tokenizer, out))
        weights = write_staged(out / WEIGHTS_FILE, lambda p: save_file(
            tensors, p, metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)}))
        staged[out / WEIGHTS_FILE] = weights
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION,
                "weights_sha256": sha256_file(weights),
                "tokenizer_files": {t.name: sha256_file(tmp) for t, tmp in staged.items()
                                    if t.name in TOKENIZER_FILES},
                "config": config.to_dict()}
        text = json.dumps(meta, indent=2, sort_keys=True)
        staged[out / CONFIG_FILE] = write_staged(
            out / CONFIG_FILE, lambda p: Path(p).write_text(text, encoding="utf-8"))
    except BaseException:
        discard_staged(staged)
        raise
    commit_staged(staged)  # the config (and its checksums) last
    for name in TOKENIZER_FILES:  # a previous tokenizer's files this save did not write
        if out / name not in staged:
            (out / name).unlink(missing_ok=True)
    return out


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def _read_meta(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_FILE
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {folder} does not exist")
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: not a kvshift_lens checkpoint folder")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
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
    return meta


def load_config(directory: str | os.PathLike) -> KVShiftConfig:
    """Read and validate ``config.json`` of a checkpoint folder."""
    path = Path(directory) / CONFIG_FILE
    meta = _read_meta(Path(directory))
    try:
        return KVShiftConfig.from_dict(meta.get("config"))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: invalid config: {e}") from None


def first_nonfinite(tensors: Mapping[str, torch.Tensor]) -> tuple[str, int] | None:
    """``(name, count)`` of the first floating-point tensor holding NaN or inf, or None."""
    for name, t in tensors.items():
        if t.is_floating_point() or t.is_complex():
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                return name, bad
    return None


def read_checkpoint(
    directory: str | os.PathLike, allow_nonfinite: bool = False
) -> tuple[KVShiftConfig, dict[str, torch.Tensor], Any]:
    """Read and verify a checkpoint folder: ``(config, state_dict, tokenizer or None)``.

    Raises:
        CheckpointError: a missing, corrupt (checksum or format), non-finite (unless
            ``allow_nonfinite``) or code-running checkpoint, naming the file and the problem.
    """
    folder = Path(directory)
    meta = _read_meta(folder)
    cfg = load_config(folder)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{weights} is missing")
    expected = meta.get("weights_sha256")
    if expected is not None and sha256_file(weights) != expected:
        raise CheckpointError(
            f"{weights} does not match the checksum in {folder / CONFIG_FILE}: the file is "
            "corrupt, was changed after saving, or a save was interrupted")
    try:
        state = load_file(weights)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights} is corrupt or not a safetensors file ({e})") from None
    bad = None if allow_nonfinite else first_nonfinite(state)
    if bad is not None:
        raise CheckpointError(
            f"{weights}: tensor {bad[0]} holds {bad[1]} non-finite value(s) (NaN/inf); refusing "
            "to load it (allow_nonfinite=True loads it anyway, for inspection)")
    return cfg, state, _read_tokenizer(folder, meta)


def _read_tokenizer(folder: Path, meta: Mapping[str, Any]) -> Any:
    """The checkpoint's tokenizer: the files its config lists, checked against their checksums
    (older checkpoints list none: whatever tokenizer the folder holds); never code."""
    listed = meta.get("tokenizer_files")
    if isinstance(listed, Mapping):
        if not listed:
            return None
        for name, digest in listed.items():
            path = folder / str(name)
            if not path.is_file():
                raise CheckpointError(f"{path} is missing (listed in {folder / CONFIG_FILE})")
            if sha256_file(path) != digest:
                raise CheckpointError(f"{path} does not match the checksum in "
                                      f"{folder / CONFIG_FILE}")
    try:
        return load_tokenizer(folder, missing_ok=True)
    except (ValueError, OSError) as e:  # TokenizerError and friends: one line, naming the file
        raise CheckpointError(f"{folder}: {e}") from None


def check_state_dict(
    expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], source: Path
) -> None:
    """Raise :class:`CheckpointError` unless ``state`` has exactly ``expected``'s names, shapes
    and dtypes (``source`` names the file in the message)."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{source} does not match its config: missing {missing[:8]}"
            f"{'...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
            f"{'...' if len(unexpected) > 8 else ''}"
        )
    for k, v in state.items():
        if v.shape != expected[k].shape:
            raise CheckpointError(
                f"{source}: tensor {k} has shape {tuple(v.shape)}, config expects "
                f"{tuple(expected[k].shape)}"
            )
        if v.dtype != expected[k].dtype:
            raise CheckpointError(
                f"{source}: tensor {k} has dtype {v.dtype}, config says {expected[k].dtype}")


__all__ = [
    "CONFIG_FILE",
    "CheckpointError",
    "WEIGHTS_FILE",
    "check_state_dict",
    "first_nonfinite",
    "load_config",
    "read_checkpoint",
    "save_checkpoint_files",
]
