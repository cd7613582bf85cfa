"""Ranks of a distributed run (DDP, torchrun, SLURM): whether a process group is up, a
barrier, rank 0's decision on every rank, ``shutdown`` at the end of a run, and
``rank_local`` for an evaluation rank 0 runs alone while the others wait."""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Processes of the run: the process group's size, or before it exists the launcher's
    ``WORLD_SIZE`` (torchrun, Lightning's launcher), else 1."""
    if distributed():
        return dist.get_world_size()
    return max(1, int(os.environ.get("WORLD_SIZE", "1")))


def barrier() -> None:
    if distributed():
        dist.barrier()


def shutdown() -> None:
    """The end of a finished run on every rank: wait until rank 0 has written its records,
    then destroy the process group. A rank that exited with the group alive could abort in
    gloo's teardown ("terminate called without an active exception"), and Lightning's
    launcher then kills rank 0, which may still be writing; PyTorch asks for an explicit
    ``destroy_process_group`` before exit."""
    if distributed():
        dist.barrier()
        dist.destroy_process_group()


def agree(flag: bool) -> bool:
    """Rank 0's ``flag`` on every rank."""
    if not distributed():
        return flag
    box = [flag]
    dist.broadcast_object_list(box, src=0)
    return bool(box[0])


@contextlib.contextmanager
def rank_local(*modules: torch.nn.Module):
    """Rank 0's evaluation while the other ranks wait: torchmetrics' metrics made inside,
    and those of ``modules`` (made before, e.g. during a DDP fit), do not all-gather across
    the (idle) process group."""
    if not distributed():
        yield
        return
    import torchmetrics.metric

    def local() -> bool:
        return False

    made = [m for module in modules for m in module.modules()
            if isinstance(m, torchmetrics.Metric)]
    saved = [m.distributed_available_fn for m in made]
    original = torchmetrics.metric.jit_distributed_available
    torchmetrics.metric.jit_distributed_available = local
    for metric in made:
        metric.distributed_available_fn = local
    try:
        yield
    finally:
        torchmetrics.metric.jit_distributed_available = original
        for metric, fn in zip(made, saved, strict=True):
            metric.distributed_available_fn = fn
