"""The base LightningModule every pretraining method derives from (solo-learn style).

It owns the optimizer (AdamW over weight-decay groups, lr from MAE's linear scaling rule), the
per-step warmup + half-cycle cosine schedule, and logging of the learning rate. A method
implements ``forward`` and ``pretrain_loss(batch)`` and, when it has them, ``no_decay_names``
and ``optimizer_groups``.
"""

from __future__ import annotations

import math

import lightning as L
import torch

from visionbench.methods.schedule import (
    absolute_lr,
    half_cycle_cosine,
    set_lr,
    weight_decay_groups,
)


class PretrainModule(L.LightningModule):
    def __init__(
        self,
        *,
        batch_size: int,
        blr: float,
        weight_decay: float,
        warmup_epochs: float,
        epochs: int,
        min_lr: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.95),
    ) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.blr = blr
        self.weight_decay = weight_decay
        self.warmup_epochs = warmup_epochs
        self.epochs = epochs
        self.min_lr = min_lr
        self.betas = tuple(betas)
        self.base_lr = absolute_lr(blr, batch_size)

    # -- methods override these ------------------------------------------------------------
    def pretrain_loss(self, batch, generator_seed: int | None = None) -> torch.Tensor:
        raise NotImplementedError("a pretraining method defines its loss")

    def optimizer_groups(self) -> list[dict]:
        return weight_decay_groups(self, self.weight_decay)

    # -- shared machinery --------------------------------------------------------------------
    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss = self.pretrain_loss(batch)
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=True, sync_dist=True)
        return loss

    def validation_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss = self.pretrain_loss(batch, generator_seed=batch_idx)
        self.log("val_loss", loss, prog_bar=True, on_epoch=True, sync_dist=True)
        return loss

    def configure_optimizers(self):
        trainer = self.trainer
        self.base_lr = absolute_lr(
            self.blr, self.batch_size, trainer.accumulate_grad_batches, trainer.world_size
        )
        return torch.optim.AdamW(self.optimizer_groups(), lr=self.base_lr, betas=self.betas)

    def steps_per_epoch(self) -> int:
        trainer = self.trainer
        batches = trainer.num_training_batches
        if not math.isfinite(batches) or batches <= 0:
            return 1
        return max(1, int(batches) // trainer.accumulate_grad_batches)

    def lr_warmup_steps(self) -> int:
        """The lr warmup in optimizer steps (norms that follow it read this)."""
        return round(self.warmup_epochs * self.steps_per_epoch())

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        epoch = self.global_step / self.steps_per_epoch()
        lr = half_cycle_cosine(epoch, self.base_lr, self.min_lr, self.warmup_epochs, self.epochs)
        set_lr(self.trainer.optimizers[0], lr)
        self.log("lr", lr, on_step=True, on_epoch=False)
