"""Resumable training checkpoints, without pickle.

A checkpoint is a folder ``checkpoints/step_{step:08d}/`` holding the model (``config.json`` +
``model.safetensors``, as ``save_pretrained`` writes them), ``trainer_state.safetensors`` (the
optimiser's tensors and the RNG states) and ``trainer_state.json`` (step, optimiser
hyper-parameters, the scheduler's position, everything else scalar, and the SHA-256 of
``trainer_state.safetensors``). It is written under a temporary name and renamed into place, then
``checkpoints/latest`` (a one-line file) is replaced atomically: a crash at any moment leaves the
previous checkpoint intact, and a reader that finds ``latest`` pointing nowhere falls back to the
newest complete step folder (:func:`kvshift_lens.run_folder.latest_checkpoint`).

Every way a checkpoint can be damaged by hand or by a disk (a missing or truncated file, edited
JSON, a tensor of the wrong shape) is reported as one :class:`CheckpointError` naming the file.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from kvshift_lens._files import fsync_dir, fsync_file, sha256_file
from kvshift_lens.checkpoint import CheckpointError
from kvshift_lens.run_folder import CHECKPOINTS_DIR, checkpoint_folders, write_latest

STATE_TENSORS = "trainer_state.safetensors"
STATE_JSON = "trainer_state.json"


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, state_meta = {}, {}
    for pid, pstate in sd["state"].items():
        state_meta[str(pid)] = {}
        for name, value in pstate.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{pid}.{name}"] = value.detach().cpu().contiguous()
                state_meta[str(pid)][name] = "tensor"
            else:
                state_meta[str(pid)][name] = value
    return tensors, {"state": state_meta, "param_groups": sd["param_groups"]}


def optimizer_tensors(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The optimiser's state tensors by their checkpoint names (``optimizer.<id>.<name>``)."""
    return _flatten_optimizer(opt)[0]


def save_checkpoint(
    run_dir: Path,
    step: int,
    model,
    optimizer: torch.optim.Optimizer,
    scheduler,
    generators: Mapping[str, torch.Generator],
    extra: Mapping[str, Any],
    keep: int,
) -> Path:
    """Write a resumable checkpoint for ``step`` and point ``latest`` at it; keep the newest
    ``keep`` step folders. An existing folder for the same step is replaced only once the new one
    is complete."""
    ckpt_root = Path(run_dir) / CHECKPOINTS_DIR
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step_{step:08d}"
    tmp = ckpt_root / f".step_{step:08d}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp)
    tensors, opt_meta = _flatten_optimizer(optimizer)
    for name, gen in generators.items():
        tensors[f"rng.{name}"] = gen.get_state()
    tensors["rng.torch_global"] = torch.get_rng_state()
    save_file(tensors, str(tmp / STATE_TENSORS))
    meta = {"step": step, "optimizer": opt_meta, "scheduler": scheduler.state_dict(),
            "generators": sorted(generators), "state_sha256": sha256_file(tmp / STATE_TENSORS),
            **extra}
    (tmp / STATE_JSON).write_text(json.dumps(meta, indent=1))
    for f in tmp.iterdir():
        fsync_file(f)
    replaced = None
    if final.exists():
        replaced = ckpt_root / f".step_{step:08d}.replaced"
        shutil.rmtree(replaced, ignore_errors=True)
        os.replace(final, replaced)
    os.replace(tmp, final)
    fsync_dir(ckpt_root)
    write_latest(run_dir, final)
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)
    for stale in checkpoint_folders(run_dir)[:-keep]:
        if stale != final:
            shutil.rmtree(stale, ignore_errors=True)
    return final


def _bad(folder: Path, what: str) -> CheckpointError:
    return CheckpointError(f"checkpoint {folder}: {what}; it cannot be resumed from (delete the "
                           "folder to resume from an earlier checkpoint, or start again with "
                           "--overwrite)")


def load_checkpoint_state(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read and check the trainer state of a checkpoint folder (the model is read by
    ``from_pretrained``).

    Raises:
        CheckpointError: a missing, corrupt or malformed state file, naming it.
    """
    folder = Path(folder)
    json_path, tensor_path = folder / STATE_JSON, folder / STATE_TENSORS
    for path in (json_path, tensor_path):
        if not path.is_file():
            raise _bad(folder, f"{path.name} is missing")
    try:
        meta = json.loads(json_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _bad(folder, f"{json_path.name} is not valid JSON ({e})") from None
    expected = meta.get("state_sha256") if isinstance(meta, dict) else None
    if expected is not None and sha256_file(tensor_path) != expected:
        raise _bad(folder, f"{tensor_path.name} does not match the checksum in {json_path.name}")
    try:
        tensors = load_file(str(tensor_path))
    except (SafetensorError, OSError, ValueError) as e:
        raise _bad(folder, f"{tensor_path.name} is corrupt ({e})") from None
    _check_meta(folder, meta, tensors)
    return tensors, meta


def _check_meta(folder: Path, meta: Any, tensors: Mapping[str, torch.Tensor]) -> None:
    if not isinstance(meta, dict):
        raise _bad(folder, f"{STATE_JSON} must hold a JSON object")
    if not isinstance(meta.get("step"), int) or isinstance(meta.get("step"), bool) \
            or meta["step"] < 0:
        raise _bad(folder, f"{STATE_JSON} has no valid 'step' (got {meta.get('step')!r})")
    opt = meta.get("optimizer")
    if not (isinstance(opt, dict) and isinstance(opt.get("state"), dict)
            and isinstance(opt.get("param_groups"), list)):
        raise _bad(folder, f"{STATE_JSON} has no valid 'optimizer' (state and param_groups)")
    for pid, fields in opt["state"].items():
        if not isinstance(fields, dict):
            raise _bad(folder, f"{STATE_JSON}: optimizer state {pid!r} is not an object")
        for name, value in fields.items():
            if value == "tensor" and f"optimizer.{pid}.{name}" not in tensors:
                raise _bad(folder, f"{STATE_TENSORS} lacks optimizer.{pid}.{name}")
    if not isinstance(meta.get("scheduler"), dict):
        raise _bad(folder, f"{STATE_JSON} has no valid 'scheduler'")
    gens = meta.get("generators", [])
    if not isinstance(gens, list):
        raise _bad(folder, f"{STATE_JSON}: 'generators' must be a list")
    for name in [*gens, "torch_global"]:
        t = tensors.get(f"rng.{name}")
        if t is None or t.dtype != torch.uint8 or t.ndim != 1:
            raise _bad(folder, f"{STATE_TENSORS} lacks a valid RNG state rng.{name}")


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor],
                      meta: Mapping[str, Any], folder: Path) -> None:
    """Load the optimiser state, checking it fits the optimiser's parameters."""
    opt = meta["optimizer"]
    params = [p for g in optimizer.param_groups for p in g["params"]]
    groups = opt["param_groups"]
    n_saved = sum(len(g.get("params", [])) for g in groups if isinstance(g, dict))
    if len(groups) != len(optimizer.param_groups) or n_saved != len(params):
        raise _bad(folder, f"its optimiser has {len(groups)} parameter groups / {n_saved} "
                           f"parameters, this run's {len(optimizer.param_groups)} / {len(params)}")
    state = {}
    for pid, fields in opt["state"].items():
        try:
            index = int(pid)
            param = params[index]
        except (ValueError, IndexError):
            raise _bad(folder, f"{STATE_JSON}: optimizer state for unknown parameter {pid!r}") \
                from None
        entry = {}
        for name, value in fields.items():
            if value == "tensor":
                t = tensors[f"optimizer.{pid}.{name}"]
                if name in ("exp_avg", "exp_avg_sq") and t.shape != param.shape:
                    raise _bad(folder, f"optimizer.{pid}.{name} has shape {tuple(t.shape)}, the "
                                       f"parameter has {tuple(param.shape)}")
                entry[name] = t
            else:
                entry[name] = value
        state[index] = entry
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise _bad(folder, f"its optimiser state does not fit this run ({e})") from None


def restore_generators(generators: Mapping[str, torch.Generator],
                       tensors: Mapping[str, torch.Tensor], folder: Path) -> None:
    try:
        for name, gen in generators.items():
            gen.set_state(tensors[f"rng.{name}"])
        torch.set_rng_state(tensors["rng.torch_global"])
    except (KeyError, RuntimeError, ValueError) as e:
        raise _bad(folder, f"its RNG states cannot be restored ({e})") from None


__all__ = ["STATE_JSON", "STATE_TENSORS", "load_checkpoint_state", "optimizer_tensors",
           "restore_generators", "restore_optimizer", "save_checkpoint"]
