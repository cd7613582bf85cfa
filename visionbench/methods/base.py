"""The base LightningModule every pretraining method derives from (solo-learn style).

It takes the method config's ``Schedule`` whole and owns the optimizer (AdamW over
weight-decay groups by default, lr from MAE's linear scaling rule), the per-step warmup +
half-cycle cosine schedule, and logging of the learning rate. A method implements
``pretrain_loss(batch)`` over dict batches and, where it differs, ``optimizer_groups`` and
``make_optimizer``; it names its config (``config``), the backbone families it pretrains
(``families``), ``from_config(encoder, section, model, data)`` and ``train_transform``.
"""

from __future__ import annotations

import math

import lightning as L
import torch

from visionbench.data.batch import count_samples
from visionbench.methods.schedule import (
    absolute_lr,
    half_cycle_cosine,
    set_lr,
    weight_decay_groups,
)
from visionbench.schema import Schedule


class PretrainModule(L.LightningModule):
    config: type = Schedule  # a method's MethodConfig subclass
    families: tuple[str, ...] = ()  # backbone families it pretrains (visionbench.backbones)

    def __init__(
        self,
        schedule: Schedule,
        *,
        batch_size: int,
        betas: tuple[float, float] = (0.9, 0.95),
    ) -> None:
        super().__init__()
        self.schedule = schedule
        self.batch_size = batch_size
        self.blr = schedule.blr
        self.weight_decay = schedule.weight_decay
        self.warmup_epochs = schedule.warmup_epochs
        self.epochs = schedule.epochs
        self.min_lr = schedule.min_lr
        self.betas = tuple(betas)
        self.base_lr = absolute_lr(self.blr, batch_size)

    @classmethod
    def from_config(cls, encoder, section, model, data) -> PretrainModule:
        """The module ``section`` (this method's config) describes around ``encoder``; ``model``
        and ``data`` are the experiment's model and data sections."""
        raise NotImplementedError(f"{cls.__name__}: a pretraining method defines from_config")

    @classmethod
    def train_transform(cls, section, data):
        """The callable that maps a reader's sample dict (``image``: PIL image, ``label``) to
        the training sample dict this method's ``pretrain_loss`` reads."""
        raise NotImplementedError(f"{cls.__name__}: a pretraining method defines its "
                                  "train_transform")

    # -- methods override these ------------------------------------------------------------
    def pretrain_loss(self, batch, generator_seed: int | None = None) -> torch.Tensor:
        raise NotImplementedError("a pretraining method defines its loss")

    def optimizer_groups(self) -> list[dict]:
        return weight_decay_groups(self, self.weight_decay)

    def make_optimizer(self, groups: list[dict], lr: float) -> torch.optim.Optimizer:
        return torch.optim.AdamW(groups, lr=lr, betas=self.betas)

    # -- shared machinery --------------------------------------------------------------------
    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss = self.pretrain_loss(batch)
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=True, sync_dist=True,
                 batch_size=count_samples(batch))
        return loss

    def validation_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss = self.pretrain_loss(batch, generator_seed=batch_idx)
        self.log("val_loss", loss, prog_bar=True, on_epoch=True, sync_dist=True,
                 batch_size=count_samples(batch))
        return loss

    def configure_optimizers(self):
        trainer = self.trainer
        self.base_lr = absolute_lr(
            self.blr, self.batch_size, trainer.accumulate_grad_batches, trainer.world_size
        )
        return self.make_optimizer(self.optimizer_groups(), self.base_lr)

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
