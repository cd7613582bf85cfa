"""Learning-rate schedule and parameter groups shared by every method and protocol.

``half_cycle_cosine`` is facebookresearch/mae ``util/lr_sched.py``: linear warmup over
``warmup_epochs`` then a half-cycle cosine from ``base_lr`` down to ``min_lr``, evaluated at a
fractional epoch so it changes every step. ``weight_decay_groups`` is timm's
``add_weight_decay`` as ``main_pretrain.py`` uses it: no decay for biases and 1-D parameters.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn


def half_cycle_cosine(
    epoch: float, base_lr: float, min_lr: float, warmup_epochs: float, epochs: float
) -> float:
    """The lr at a fractional ``epoch`` (``epoch + step / steps_per_epoch``); clamps at the end."""
    if epoch < warmup_epochs:
        return base_lr * epoch / warmup_epochs
    span = epochs - warmup_epochs
    if span <= 0:
        return base_lr
    progress = min((epoch - warmup_epochs) / span, 1.0)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def momentum_at(k: int, total: int, base: float) -> float:
    """``1 - (1 - base) (cos(pi k / K) + 1) / 2``: ``base`` at ``k = 0``, 1 at ``k = K``
    (BYOL / MoCo v3 / PixPro's momentum schedule; ``k`` is clamped at ``K``)."""
    k = min(k, total)
    return 1.0 - (1.0 - base) * (math.cos(math.pi * k / max(total, 1)) + 1.0) / 2.0


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's lr to ``lr`` times its ``lr_scale`` (1 where it has none)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def weight_decay_groups(
    model: nn.Module, weight_decay: float, skip: Iterable[str] = ()
) -> list[dict]:
    skip = set(skip)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or name.endswith(".bias") or name in skip:
            no_decay.append(param)
        else:
            decay.append(param)
    return [
        {"params": no_decay, "weight_decay": 0.0},
        {"params": decay, "weight_decay": weight_decay},
    ]


def ensure_trained(trainer, label: str) -> None:
    """A fit that ran no optimizer step must not count as done: one clear error instead."""
    if trainer.global_step == 0 and not getattr(trainer, "fast_dev_run", False):
        from visionbench.errors import DataError

        raise DataError(f"{label}: no optimizer step ran (the training loader held no full "
                        "batch); lower the batch size or give more data")


def absolute_lr(blr: float, batch_size: int, accumulate: int = 1, world_size: int = 1) -> float:
    """MAE's linear scaling rule: lr = blr * effective batch / 256."""
    return blr * batch_size * accumulate * world_size / 256
