"""Supervised training from scratch: a backbone and a linear classifier trained end to end.

The protocol of the conv-norm papers' ResNet comparisons (GroupNorm arXiv 1803.08494 Sec. 6.1,
BCN+WS arXiv 1903.10520, EvoNorm arXiv 2004.02967): SGD with momentum 0.9 and Nesterov off,
lr = 0.1 x batch / 256, weight decay 1e-4 on every weight, linear warmup then cosine decay
per step (as torchvision's ``references/classification/train.py`` recipe; the project's
``half_cycle_cosine``), cross-entropy. The
test split is scored by the weights at the end of training.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
import torchmetrics
from torch import Tensor, nn

from visionbench.data.batch import unpack
from visionbench.evals.finetune import TestHits
from visionbench.methods.schedule import ensure_trained, half_cycle_cosine, set_lr
from visionbench.results.bootstrap import with_samples


class SupervisedClassifier(L.LightningModule):
    def __init__(self, backbone: nn.Module, num_classes: int, *, lr: float = 0.1,
                 momentum: float = 0.9, weight_decay: float = 1e-4, warmup_epochs: float = 1,
                 epochs: int = 90, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.num_features, num_classes)
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.warmup_epochs, self.epochs = warmup_epochs, epochs
        self.loss = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        metric = dict(task="multiclass", num_classes=num_classes, sync_on_compute=False)
        self.val_top1 = torchmetrics.Accuracy(**metric)
        self.test_top1 = torchmetrics.Accuracy(**metric)
        self.test_top5 = torchmetrics.Accuracy(top_k=min(5, num_classes), **metric)
        self.test_hits = TestHits(min(5, num_classes))  # per-sample hits of the last test

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.backbone(images))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum,
                               weight_decay=self.weight_decay)

    def lr_warmup_steps(self) -> int:
        return round(self.warmup_epochs * max(1, int(self.trainer.num_training_batches)))

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        per_epoch = max(1, int(self.trainer.num_training_batches))
        lr = half_cycle_cosine(self.global_step / per_epoch, self.lr, 0.0, self.warmup_epochs,
                               self.epochs)
        set_lr(self.trainer.optimizers[0], lr)
        self.log("lr", lr, on_step=True, on_epoch=False)

    def training_step(self, batch, batch_idx: int) -> Tensor:
        images, targets = unpack(batch, "image", "label")
        loss = self.loss(self(images), targets)
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=True,
                 batch_size=images.shape[0])
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        images, targets = unpack(batch, "image", "label")
        self.val_top1.update(self(images), targets)

    def on_validation_epoch_end(self) -> None:
        self.log("val_top1", self.val_top1.compute() * 100, prog_bar=True)
        self.val_top1.reset()

    def test_step(self, batch, batch_idx: int) -> None:
        images, targets = unpack(batch, "image", "label")
        logits = self(images)
        self.test_top1.update(logits, targets)
        self.test_top5.update(logits, targets)
        self.test_hits.update(logits, targets)

    def on_test_epoch_start(self) -> None:
        self.test_hits.reset()


def run_supervised(backbone: nn.Module, train_loader, val_loader, test_loader, num_classes: int,
                   cfg: dict, trainer_kwargs: dict, out_dir: Path,
                   callbacks: tuple = (), keep_model: bool = False, *,
                   keep_samples: bool = True, seed: int | None = None,
                   test: bool = True) -> dict:
    """Train ``backbone`` (in place) with a linear head; returns test top-1/top-5 in percent
    (and with ``keep_model`` the trained ``SupervisedClassifier`` under ``"model"``). With
    ``keep_samples`` (the default) also the per-sample test hits, ``"samples": {"kind":
    "hits", "n", "top1": "0110...", "top5": ...}``, and their 95% bootstrap intervals
    ``"ci": {"top1": [low, high], "top5": [low, high]}`` (1,000 resamples seeded by ``seed``,
    0 when None; ``visionbench.results.bootstrap``).

    A callback may stop training early (e.g. ``DivergenceMonitor``); the caller checks it.
    ``test=False``: trained only, ``{"epochs", "model"}``, for a fit on several processes
    whose test runs on one (``score_supervised``).
    """
    model = SupervisedClassifier(backbone, num_classes, **cfg)
    trainer = L.Trainer(
        max_epochs=cfg.get("epochs", 90),
        default_root_dir=out_dir,
        logger=L.pytorch.loggers.CSVLogger(out_dir, name="logs", version=""),
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        log_every_n_steps=5,
        callbacks=list(callbacks),
        **trainer_kwargs,
    )
    trainer.fit(model, train_loader, val_loader)
    ensure_trained(trainer, "supervised training")
    if not test:
        return {"epochs": model.epochs, "model": model}
    result = _scored(model, trainer, test_loader, keep_samples, seed)
    if keep_model:
        result["model"] = model
    return result


def _scored(model: SupervisedClassifier, trainer: L.Trainer, test_loader, keep_samples: bool,
            seed: int | None) -> dict:
    model.eval()
    trainer.test(model, test_loader, verbose=False)
    result = {
        "test_top1": float(model.test_top1.compute()) * 100,
        "test_top5": float(model.test_top5.compute()) * 100,
        "epochs": model.epochs,
    }
    samples = model.test_hits.samples()
    if keep_samples and samples is not None:
        with_samples(result, samples, seed)
    model.test_hits.reset()
    return result


def score_supervised(model: SupervisedClassifier, test_loader, trainer_kwargs: dict, *,
                    keep_samples: bool = True, seed: int | None = None) -> dict:
    """The test of a trained ``SupervisedClassifier`` (as ``run_supervised`` scores it) on
    a trainer of its own (``trainer_kwargs``: one device)."""
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        **trainer_kwargs)
    return _scored(model, trainer, test_loader, keep_samples, seed)
