"""The timing loop the step benchmarks share: one optimizer step of a loss under the run's
precision (autocast, a GradScaler for float16 on CUDA), warm-up steps, then ``steps`` timed
steps with CUDA synchronized around them and its peak memory read."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def train_step(loss_fn: Callable[[], torch.Tensor], optimizer: torch.optim.Optimizer,
               device: str, precision: str) -> Callable[[], None]:
    """A function doing one step: ``loss_fn()`` under autocast, backward, optimizer step."""
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler(enabled=precision == "16-mixed" and device == "cuda")

    def step() -> None:
        with torch.autocast(device_type=device, dtype=dtype, enabled=dtype is not None):
            loss = loss_fn()
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    return step


def timed_steps(step: Callable[[], None], steps: int, warmup: int, device: str
                ) -> tuple[float, float]:
    """(seconds for ``steps`` steps after ``warmup`` untimed ones, peak GiB on CUDA else
    nan)."""
    for _ in range(warmup):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    return elapsed, peak
