"""Data parallelism through ``torchrun``: process-group set-up from the environment, and the few
collectives the trainer needs. A single process (no ``WORLD_SIZE`` in the environment) runs with no
process group at all."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")


def init_from_env(device: str = "auto") -> DistContext:
    """Join the process group ``torchrun`` describes (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistContext(rank=rank, world_size=world, device=dev)


def wrap(model: torch.nn.Module, ctx: DistContext) -> torch.nn.Module:
    if ctx.world_size == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def all_reduce_sum(x: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    if ctx.world_size == 1:
        return x
    x = x.clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def all_ok(ok: bool, ctx: DistContext) -> bool:
    """True when ``ok`` holds on every process (one collective; ``ok`` itself alone)."""
    if ctx.world_size == 1:
        return ok
    flag = torch.tensor([1 if ok else 0], device=ctx.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def barrier(ctx: DistContext) -> None:
    if ctx.world_size > 1:
        dist.barrier()
