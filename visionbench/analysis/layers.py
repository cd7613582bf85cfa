"""Per-block training statistics: gradient norm and hidden-state variance of each ViT block.

The two analyses of the depth papers in the norm catalog:

- gradient norm of each block's parameters at fixed training steps (Mix-LN, arXiv 2412.13795,
  Fig. 1/3; The Curse of Depth, arXiv 2502.05795): Pre-LN starves the deep blocks, Post-LN the
  shallow ones;
- variance of the hidden state (the residual stream leaving each block) (Peri-LN, arXiv
  2502.02732, Fig. 2): Pre-LN's grows with depth, Peri-LN keeps it flat.

``BlockStatsCallback`` records both during training at the steps asked for and keeps them in
its state, so a resumed run keeps the steps recorded before the kill.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import lightning as L
import torch
from torch import nn


def block_grad_norms(blocks: Sequence[nn.Module]) -> list[float]:
    """The L2 norm of the gradient of each block's parameters (0 where none has a gradient)."""
    norms = []
    for block in blocks:
        squares = [p.grad.detach().float().pow(2).sum() for p in block.parameters()
                   if p.grad is not None]  # fmt: skip
        norms.append(float(torch.stack(squares).sum().sqrt()) if squares else 0.0)
    return norms


def hidden_variance(hidden: torch.Tensor) -> float:
    """Variance of a block's output over every sample, token and feature."""
    return float(hidden.detach().float().var(unbiased=False))


class BlockStatsCallback(L.Callback):
    """Records ``grad_norm`` and ``variance`` per block at each step of ``steps``.

    ``blocks_of(module)`` returns the block list (default: ``module.encoder.blocks``). The
    variance is measured on the training forward of that step, the gradient after its backward.
    ``self.records`` maps the step to ``{"grad_norm": [...], "variance": [...]}``.
    """

    def __init__(
        self,
        steps: Sequence[int],
        blocks_of: Callable[[nn.Module], Sequence[nn.Module]] = lambda m: m.encoder.blocks,
    ) -> None:
        self.steps = sorted(set(int(s) for s in steps))
        self.blocks_of = blocks_of
        self.records: dict[int, dict[str, list[float]]] = {}
        self._hooks: list = []
        self._variance: list[float] = []

    def _recording(self, trainer: L.Trainer) -> bool:
        return trainer.global_step in self.steps and trainer.global_step not in self.records

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not self._recording(trainer):
            return
        blocks = list(self.blocks_of(pl_module))
        self._variance = [float("nan")] * len(blocks)

        def hook(index: int):
            def record(_module, _inputs, output):
                self._variance[index] = hidden_variance(output)
            return record

        self._hooks = [b.register_forward_hook(hook(i)) for i, b in enumerate(blocks)]

    def on_after_backward(self, trainer, pl_module) -> None:
        self._remove_hooks()
        if not self._recording(trainer):
            return
        grads = block_grad_norms(list(self.blocks_of(pl_module)))
        self.records[trainer.global_step] = {"grad_norm": grads, "variance": self._variance}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._remove_hooks()  # a step whose backward never ran (e.g. a skipped batch)

    def _remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def state_dict(self) -> dict:
        return {"records": {str(k): v for k, v in self.records.items()}}

    def load_state_dict(self, state_dict: dict) -> None:
        self.records = {int(k): v for k, v in state_dict.get("records", {}).items()}


class DivergenceMonitor(L.Callback):
    """Stops training at the first non-finite loss and remembers the step (``diverged_at``).

    A diverged entry of an ablation is a result, not a crash: the caller records the step and
    goes on with the next entry. The loss is read from the training step's output; under DDP
    a non-finite loss on any rank stops every rank (``diverged_at`` is that step on all).
    """

    def __init__(self) -> None:
        self.diverged_at: int | None = None
        self.loss: float | None = None
        self._step = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step = trainer.global_step  # the step this batch's loss belongs to

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        value = math.nan if loss is None else float(loss.detach())
        finite = loss is None or math.isfinite(value)  # a skipped step is no divergence
        if trainer.world_size > 1:  # every rank stops at the same step (DDP)
            finite = trainer.strategy.reduce_boolean_decision(finite, all=True)
            if not finite and math.isfinite(value):
                value = math.nan  # another rank's loss was the non-finite one
        if not finite:
            self.diverged_at, self.loss = self._step, value
            trainer.should_stop = True

    def state_dict(self) -> dict:
        return {"diverged_at": self.diverged_at, "loss": self.loss}

    def load_state_dict(self, state_dict: dict) -> None:
        self.diverged_at = state_dict.get("diverged_at")
        self.loss = state_dict.get("loss")
