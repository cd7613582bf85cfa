"""End-to-end fine-tuning of a pretrained backbone, the MAE recipe.

Follows facebookresearch/mae: ``main_finetune.py`` (AdamW over layer-wise lr-decayed
parameter groups, absolute lr = blr * effective batch / 256, head weight
trunc_normal(std=2e-5), label smoothing 0.1, timm ``Mixup`` + ``SoftTargetCrossEntropy``
when mixup/cutmix is on), ``util/lr_decay.py`` (layer ids and scales, BEiT style),
``util/lr_sched.py`` (per-iteration linear warmup then half-cycle cosine to ``min_lr``) and
``models_vit.py`` (``global_pool=True``: the final norm is dropped, patch tokens are
averaged and passed through ``fc_norm``; otherwise the final-normed cls token).
Drop path is set by the caller when it builds the backbone.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from visionbench.data.batch import unpack
from visionbench.errors import ConfigError
from visionbench.evals.linear_probe import topk_hits
from visionbench.methods.schedule import ensure_trained, half_cycle_cosine, set_lr
from visionbench.results.bootstrap import hits_samples, with_samples

FINETUNE_DEFAULTS = {
    "weight_decay": 0.05,
    "layer_decay": 0.75,
    "warmup_epochs": 5,
    "min_lr": 1e-6,
    "label_smoothing": 0.1,
    "mixup": 0.0,
    "cutmix": 0.0,
    "global_pool": True,
    "input_key": "image",
    "seed": None,
}
FINETUNE_REQUIRED = ("base_lr", "epochs")
INPUT_NDIM = {"image": 4, "video": 5}  # one sample's batch; one more axis: test views
# Prefix-token parameters that sit with the patch embedding in layer 0.
EMBEDDING_PARAMS = ("cls_token", "pos_embed", "reg_token", "dist_token")


def find_blocks(model: nn.Module) -> tuple[str, int]:
    """The name prefix of the transformer ``blocks`` list inside ``model`` ("" for a bare
    ViT, "backbone." for a wrapped one) and its length; ("", 0) when there is none."""
    for name, module in model.named_modules():
        if name == "blocks" or name.endswith(".blocks"):
            return name[: -len("blocks")], len(module)
    return "", 0


def layer_id_for_vit(name: str, num_layers: int) -> int:
    """Layer of a ViT parameter name: embeddings (and Peri-LN's embedding norm ``norm_pre``) 0,
    ``blocks.i`` i + 1, the rest (final norm, fc_norm, head) ``num_layers``."""
    if name in EMBEDDING_PARAMS or name.startswith(("patch_embed", "norm_pre")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return num_layers


def param_groups_lrd(model: nn.Module, weight_decay: float = 0.05, layer_decay: float = 0.75,
                     no_weight_decay_list: Iterable[str] = ()) -> list[dict]:
    """AdamW parameter groups with layer-wise lr decay (MAE ``util/lr_decay.py``).

    ``num_layers = len(blocks) + 1``; a parameter in layer ``i`` gets
    ``lr_scale = layer_decay ** (num_layers - i)``. 1-D parameters (biases, norms) and the
    names in ``no_weight_decay_list`` get no weight decay. ``model`` may be the ViT itself
    or a module holding it (e.g. ``FineTuneClassifier``): names are read relative to the
    module that owns ``blocks``, and parameters outside it (head, fc_norm) sit in the top
    layer. A model without ``blocks`` (a ResNet) gets scale 1 everywhere.
    """
    prefix, depth = find_blocks(model)
    num_layers = depth + 1
    no_decay_names = set(no_weight_decay_list)
    groups: dict[str, dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        inside = depth > 0 and name.startswith(prefix)
        relative = name[len(prefix):] if inside else name
        layer = layer_id_for_vit(relative, num_layers) if inside else num_layers
        no_decay = param.ndim == 1 or name in no_decay_names or relative in no_decay_names
        key = f"layer_{layer}_{'no_decay' if no_decay else 'decay'}"
        if key not in groups:
            groups[key] = {
                "lr_scale": layer_decay ** (num_layers - layer),
                "weight_decay": 0.0 if no_decay else weight_decay,
                "params": [],
                "name": key,
            }
        groups[key]["params"].append(param)
    return list(groups.values())


class TestHits:
    """The per-sample top-1 and top-k hits of one test epoch, in the order the test loader
    gives the samples (those this process scores: a single-process test sees them all)."""

    def __init__(self, top_k: int) -> None:
        self.top_k = top_k
        self.reset()

    def reset(self) -> None:
        self.top1: list[Tensor] = []
        self.topk: list[Tensor] = []

    def update(self, logits: Tensor, targets: Tensor) -> None:
        logits = logits.detach()
        self.top1.append(topk_hits(logits, targets, 1))
        self.topk.append(topk_hits(logits, targets, self.top_k))

    def samples(self) -> dict | None:
        """The ``"samples"`` record (``visionbench.results.bootstrap``), None before a test."""
        if not self.top1:
            return None
        return hits_samples(top1=torch.cat(self.top1), top5=torch.cat(self.topk))


class FineTuneClassifier(L.LightningModule):
    """A timm backbone (``num_classes=0``) plus a linear head, trained end to end.

    ``base_lr`` is the absolute peak lr (``run_finetune`` turns MAE's blr into it). For a
    ViT with ``global_pool=True`` the backbone's final norm is replaced by ``Identity``
    (MAE deletes it) and the head reads ``fc_norm(mean of patch tokens)``.

    ``input_key`` is the batch key of the inputs: ``image`` (B, C, H, W) or ``video``
    (B, C, T, H, W). A test batch with one more axis holds views of each sample (``(B, V,
    ...)``: VideoMAE's clips x crops); their softmax probabilities are averaged, as the
    official ``merge`` (``method='prob'``) scores a video, and the test loss is the
    cross-entropy of that average. A training batch with one more axis holds repeated
    augmentations (``(B, S, ...)``, each trained with its sample's label).

    Mixup / CutMix are timm's ``Mixup`` on the batch as it is, as VideoMAE V2's
    ``run_class_finetuning.py`` calls it on ``(B, C, T, H, W)`` clips: CutMix's box, drawn
    for ``H x W``, then cuts axes 2 and 3 (frames and rows, every column), and its lambda is
    corrected by that box's area in ``H x W``. We keep the official behaviour.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, base_lr: float,
                 weight_decay: float = 0.05, layer_decay: float = 0.75,
                 warmup_epochs: float = 5, epochs: int = 50, min_lr: float = 1e-6,
                 label_smoothing: float = 0.1, mixup: float = 0.0, cutmix: float = 0.0,
                 global_pool: bool = True, input_key: str = "image") -> None:
        super().__init__()
        if input_key not in INPUT_NDIM:
            raise ConfigError(f"finetune: input_key {input_key!r}; allowed: "
                              f"{', '.join(INPUT_NDIM)}")
        self.save_hyperparameters(ignore=["backbone"])
        self.backbone = backbone
        self.is_vit = hasattr(backbone, "blocks")
        self.global_pool = global_pool and self.is_vit
        dim = backbone.num_features
        if self.global_pool:
            backbone.norm = nn.Identity()
            self.fc_norm = nn.LayerNorm(dim, eps=1e-6)
        else:
            self.fc_norm = nn.Identity()
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)
        nn.init.zeros_(self.head.bias)

        self.mixup_fn = None
        if mixup > 0 or cutmix > 0:
            self.mixup_fn = Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix,
                                  label_smoothing=label_smoothing, num_classes=num_classes)
            self.criterion = SoftTargetCrossEntropy()
        else:
            self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        top5 = min(5, num_classes)
        self.val_top1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.test_top1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.test_top5 = MulticlassAccuracy(num_classes, top_k=top5, average="micro")
        self.test_loss = MeanMetric()  # plain cross-entropy per test image
        self.test_hits = TestHits(top5)
        self.test_samples: dict | None = None  # per-sample hits of the last test

    def forward(self, images: Tensor) -> Tensor:
        if not self.is_vit:
            return self.head(self.backbone(images))
        tokens = self.backbone.forward_features(images)
        if self.global_pool:
            pooled = self.fc_norm(tokens[:, self.backbone.num_prefix_tokens:].mean(dim=1))
        else:
            pooled = tokens[:, 0]
        return self.head(pooled)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        no_decay = getattr(self.backbone, "no_weight_decay", lambda: set())()
        groups = param_groups_lrd(self, self.hparams.weight_decay, self.hparams.layer_decay,
                                  no_decay)
        return torch.optim.AdamW(groups, lr=self.hparams.base_lr)

    def lr_warmup_steps(self) -> int:
        batches = self.trainer.num_training_batches
        per_epoch = int(batches) // self.trainer.accumulate_grad_batches if math.isfinite(
            batches) else 1
        return round(self.hparams.warmup_epochs * max(per_epoch, 1))

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        batches = self.trainer.num_training_batches
        # An unsized loader has no fraction of an epoch: the lr then moves once per epoch.
        fraction = batch_idx / batches if math.isfinite(batches) and batches > 0 else 0.0
        epoch = self.current_epoch + fraction
        hp = self.hparams
        lr = half_cycle_cosine(epoch, hp.base_lr, hp.min_lr, hp.warmup_epochs, hp.epochs)
        for optimizer in self.trainer.optimizers:
            set_lr(optimizer, lr)

    def inputs(self, batch) -> tuple[Tensor, Tensor]:
        return unpack(batch, self.hparams.input_key, "label")

    def view_averaged_logits(self, inputs: Tensor) -> Tensor:
        """Logits, or for ``(B, V, ...)`` views the log of their mean softmax."""
        if inputs.ndim == INPUT_NDIM[self.hparams.input_key]:
            return self(inputs)
        b, v = inputs.shape[:2]
        probs = self(inputs.flatten(0, 1)).float().softmax(dim=-1).reshape(b, v, -1)
        return probs.mean(dim=1).clamp_min(torch.finfo(torch.float32).tiny).log()

    def training_step(self, batch, batch_idx: int) -> Tensor:
        images, targets = self.inputs(batch)
        if images.ndim == INPUT_NDIM[self.hparams.input_key] + 1:
            # repeated augmentation (B, S, ...): S samples of each with its label, in the
            # order of VideoMAE's multiple_samples_collate
            targets = targets.repeat_interleave(images.shape[1])
            images = images.flatten(0, 1)
        if self.mixup_fn is not None:
            images, targets = self.mix(images, targets)
        loss = self.criterion(self(images), targets)
        self.log("train_loss", loss, on_step=False, on_epoch=True, prog_bar=True,
                 batch_size=images.shape[0], sync_dist=True)
        return loss

    def mix(self, images: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """timm Mixup/CutMix with smoothed soft targets; it needs an even batch, so an odd
        last sample is dropped (MAE's loader drops the last incomplete batch)."""
        even = images.shape[0] - images.shape[0] % 2
        if even == 0:
            smoothing = self.hparams.label_smoothing
            soft = F.one_hot(targets, self.hparams.num_classes).float()
            return images, soft * (1.0 - smoothing) + smoothing / self.hparams.num_classes
        return self.mixup_fn(images[:even], targets[:even])

    def validation_step(self, batch, batch_idx: int) -> None:
        images, targets = self.inputs(batch)
        self.val_top1.update(self.view_averaged_logits(images), targets)

    def on_validation_epoch_end(self) -> None:
        self.log("val_top1", self.val_top1.compute() * 100.0, prog_bar=True)
        self.val_top1.reset()

    def test_step(self, batch, batch_idx: int) -> None:
        images, targets = self.inputs(batch)
        logits = self.view_averaged_logits(images)
        self.test_top1.update(logits, targets)
        self.test_top5.update(logits, targets)
        self.test_loss.update(F.cross_entropy(logits.float(), targets, reduction="none"))
        self.test_hits.update(logits, targets)

    def on_test_epoch_start(self) -> None:
        self.test_hits.reset()

    def on_test_epoch_end(self) -> None:
        self.test_samples = self.test_hits.samples()
        self.test_hits.reset()
        self.log("test_top1", self.test_top1.compute() * 100.0)
        self.log("test_top5", self.test_top5.compute() * 100.0)
        self.log("test_loss", self.test_loss.compute())
        self.test_loss.reset()
        self.test_top1.reset()
        self.test_top5.reset()


def finetune_config(cfg: dict) -> dict:
    """``cfg`` with MAE's defaults filled in; a missing or unknown key is a ConfigError."""
    missing = [key for key in FINETUNE_REQUIRED if key not in cfg]
    if missing:
        raise ConfigError(f"finetune: missing key(s) {missing}")
    allowed = set(FINETUNE_REQUIRED) | set(FINETUNE_DEFAULTS)
    unknown = sorted(set(cfg) - allowed)
    if unknown:
        raise ConfigError(f"finetune: unknown key(s) {unknown}; expected some of {sorted(allowed)}")
    return {**FINETUNE_DEFAULTS, **cfg}


def read_history(metrics_csv: Path) -> list[dict]:
    """Per-epoch train_loss and val_top1 from the CSVLogger's ``metrics.csv``."""
    by_epoch: dict[int, dict] = {}
    if not metrics_csv.exists():
        return []
    with metrics_csv.open(newline="") as handle:
        for row in csv.DictReader(handle):
            if not row.get("epoch"):
                continue
            entry = by_epoch.setdefault(int(float(row["epoch"])),
                                        {"train_loss": None, "val_top1": None})
            for key in ("train_loss", "val_top1"):
                if row.get(key):
                    entry[key] = float(row[key])
    return [{"epoch": epoch, **by_epoch[epoch]} for epoch in sorted(by_epoch)
            if by_epoch[epoch]["train_loss"] is not None or by_epoch[epoch]["val_top1"] is not None]


def run_finetune(backbone: nn.Module, datamodule_train_loader, val_loader, test_loader,
                 num_classes: int, cfg: dict, trainer_kwargs: dict, out_dir: Path,
                 callbacks: tuple = (), keep_model: bool = False,
                 keep_samples: bool = True, test: bool = True) -> dict:
    """Fine-tune ``backbone`` with a new head, then test it (``test=False``: not tested,
    the result holds ``"epochs"``, ``"history"`` and the ``"model"``, for a fit on several
    processes whose test runs on one, ``test_scores``).

    ``cfg["base_lr"]`` is MAE's blr: the absolute lr is blr * effective batch / 256, with the
    effective batch = loader batch size * accumulation * world size. Returns
    ``{"test_top1", "test_top5", "test_loss", "epochs", "history": [{"epoch", "train_loss",
    "val_top1"}, ...]}`` (accuracies in percent, the test loss a plain cross-entropy), and
    with ``keep_model`` the trained ``FineTuneClassifier`` under ``"model"``. With
    ``keep_samples`` (the default) also the per-sample test hits, ``"samples": {"kind":
    "hits", "n", "top1": "0110...", "top5": ...}``, and their 95% bootstrap intervals
    ``"ci": {"top1": [low, high], "top5": [low, high]}`` (1,000 resamples seeded by
    ``cfg["seed"]``, 0 when None; ``visionbench.results.bootstrap``).
    """
    cfg = finetune_config(cfg)
    out_dir = Path(out_dir)
    if cfg["seed"] is not None:
        L.seed_everything(cfg["seed"], workers=True, verbose=False)
    logger = CSVLogger(out_dir, name="finetune")
    trainer = L.Trainer(max_epochs=cfg["epochs"], default_root_dir=out_dir, logger=logger,
                        enable_checkpointing=False, callbacks=list(callbacks), **trainer_kwargs)
    batch_size = getattr(datamodule_train_loader, "batch_size", None)
    if not batch_size:
        raise ConfigError("finetune: the training loader needs a fixed batch_size to scale "
                          "the lr (absolute lr = base_lr * effective batch / 256)")
    effective_batch = batch_size * trainer.accumulate_grad_batches * trainer.world_size
    model = FineTuneClassifier(
        backbone, num_classes, base_lr=cfg["base_lr"] * effective_batch / 256,
        weight_decay=cfg["weight_decay"], layer_decay=cfg["layer_decay"],
        warmup_epochs=cfg["warmup_epochs"], epochs=cfg["epochs"], min_lr=cfg["min_lr"],
        label_smoothing=cfg["label_smoothing"], mixup=cfg["mixup"], cutmix=cfg["cutmix"],
        global_pool=cfg["global_pool"], input_key=cfg["input_key"],
    )
    trainer.fit(model, train_dataloaders=datamodule_train_loader, val_dataloaders=val_loader)
    ensure_trained(trainer, "fine-tune")
    if not test:
        return {"epochs": cfg["epochs"],
                "history": read_history(Path(logger.log_dir) / "metrics.csv"), "model": model}
    tested = trainer.test(model, dataloaders=test_loader, verbose=False)[0]
    result = {
        "test_top1": float(tested["test_top1"]),
        "test_top5": float(tested["test_top5"]),
        "test_loss": float(tested["test_loss"]),
        "epochs": cfg["epochs"],
        "history": read_history(Path(logger.log_dir) / "metrics.csv"),
    }
    if keep_samples and model.test_samples is not None:
        with_samples(result, model.test_samples, cfg["seed"])
    if keep_model:
        result["model"] = model
    return result


def test_scores(model: FineTuneClassifier, test_loader, trainer_kwargs: dict, *,
                keep_samples: bool = True, seed: int | None = 0) -> dict:
    """Test top-1 / top-5 (percent) and cross-entropy of a (changed) fine-tuned classifier;
    with ``keep_samples`` also its ``"samples"`` and ``"ci"`` (as ``run_finetune``)."""
    trainer = L.Trainer(logger=False, enable_checkpointing=False, **trainer_kwargs)
    tested = trainer.test(model, dataloaders=test_loader, verbose=False)[0]
    result = {key: float(tested[key]) for key in ("test_top1", "test_top5", "test_loss")}
    if keep_samples and model.test_samples is not None:
        with_samples(result, model.test_samples, seed)
    return result
