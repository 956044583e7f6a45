"""Resumable training checkpoints, without pickle.

A checkpoint is a folder ``checkpoints/step_{step:08d}/`` holding the model (``config.json`` +
``model.safetensors``, as :func:`save_pretrained` writes them), ``trainer_state.safetensors`` (the
optimiser's tensors and the RNG states) and ``trainer_state.json`` (step, optimiser hyper-parameters,
the scheduler's position, everything else scalar). It is written under a temporary name and renamed
into place, then ``checkpoints/latest`` (a one-line file) is replaced atomically: a crash at any
moment leaves the previous checkpoint intact and pointed to.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from kvshift_lens.checkpoint import CheckpointError, _atomic_write, save_pretrained

STATE_TENSORS = "trainer_state.safetensors"
STATE_JSON = "trainer_state.json"
LATEST = "latest"


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


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state = {}
    for pid, fields in meta["state"].items():
        state[int(pid)] = {
            name: tensors[f"optimizer.{pid}.{name}"] if value == "tensor" else value
            for name, value in fields.items()
        }
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    run_dir: Path,
    step: int,
    model,
    optimizer: torch.optim.Optimizer,
    scheduler,
    generators: dict[str, torch.Generator],
    extra: dict[str, Any],
    keep: int,
) -> Path:
    """Write a resumable checkpoint for ``step`` and point ``latest`` at it."""
    ckpt_root = Path(run_dir) / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step_{step:08d}"
    tmp = ckpt_root / f".step_{step:08d}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    save_pretrained(model, tmp)
    tensors, opt_meta = _flatten_optimizer(optimizer)
    for name, gen in generators.items():
        tensors[f"rng.{name}"] = gen.get_state()
    tensors["rng.torch_global"] = torch.get_rng_state()
    save_file(tensors, str(tmp / STATE_TENSORS))
    meta = {"step": step, "optimizer": opt_meta, "scheduler": scheduler.state_dict(),
            "generators": sorted(generators), **extra}
    (tmp / STATE_JSON).write_text(json.dumps(meta, indent=1))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _atomic_write(ckpt_root / LATEST, lambda p: Path(p).write_text(final.name + "\n"))
    old = sorted(p for p in ckpt_root.glob("step_*") if p.is_dir())
    for stale in old[:-keep]:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The folder ``checkpoints/latest`` points to, or None when the run has no checkpoint."""
    pointer = Path(run_dir) / "checkpoints" / LATEST
    if not pointer.is_file():
        return None
    folder = pointer.parent / pointer.read_text().strip()
    if not folder.is_dir():
        raise CheckpointError(f"{pointer} points to {folder.name}, which does not exist")
    return folder


def load_checkpoint_state(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read the trainer state of a checkpoint folder (the model is read by from_pretrained)."""
    try:
        tensors = load_file(str(folder / STATE_TENSORS))
        meta = json.loads((folder / STATE_JSON).read_text())
    except FileNotFoundError as e:
        raise CheckpointError(f"checkpoint {folder} is incomplete: {e.filename} is missing") \
            from None
    except (SafetensorError, json.JSONDecodeError, OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {folder} is corrupt ({e})") from None
    return tensors, meta


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    optimizer.load_state_dict(_unflatten_optimizer(tensors, meta["optimizer"]))


def restore_generators(generators: dict[str, torch.Generator], tensors: dict) -> None:
    for name, gen in generators.items():
        gen.set_state(tensors[f"rng.{name}"])
    torch.set_rng_state(tensors["rng.torch_global"])
