"""Semantic segmentation transfer: UNIP's fine-tuning (LL-FPN + UperNet) and linear probing.

Follows casiatao/UNIP ``UNIP_segmentation/`` (mmcv-full 1.3.0, mmsegmentation 0.11.0):

- ``backbone/mae.py`` (fine-tuning backbone ``MAE``): patch tokens of the blocks in
  ``out_indices``, without the final norm (``use_norm=False``), reshaped to (B, C, H/p, W/p)
  and sent through ``fpn1..fpn4``. For patch 16: ConvTranspose(2, 2) -> BatchNorm (SyncBN)
  -> GELU -> ConvTranspose(2, 2); ConvTranspose(2, 2); Identity; MaxPool(2, 2). For patch 8:
  ConvTranspose(2, 2); Identity; MaxPool(2, 2); MaxPool(4, 4). ``train_scripts/train_vit_*.sh``
  sets ``out_indices=[11,11,11,11]``: LL-FPN, the pyramid built from the last block alone.
- ``configs/_base_/models/upernet.py`` + ``configs/fine_tuning/upernet_vit_*_512_slide_*``:
  mmseg ``UPerHead`` (pool scales 1, 2, 3, 6; ``channels`` = embed dim; dropout 0.1; BN;
  align_corners False) and an auxiliary ``FCNHead`` on the third pyramid level (256 channels,
  one 3x3 conv, dropout 0.1, loss weight 0.4); cross-entropy, ignore index 255; AdamW
  lr 1e-4, betas (0.9, 0.999), weight decay 0.05; drop path 0.1 (0.2 for ViT-L);
  ``poly`` power 1.0, min_lr 0, linear warmup (ratio 1e-6) over ~10% of the iterations
  (1500 of 14400 for SODA, 1000 of 9800 for MFNet, 1700 of 16800 for SCUT-Seg);
  512 px crops; ``slide`` inference with crop 512, stride 341.
- ``mmcv_custom/layer_decay_optimizer_constructor.py``: embeddings in layer 0, block i in
  layer i + 1, everything else (LL-FPN, heads) at full lr, scale ``rate ** (depth + 1 -
  layer)``; no weight decay for 1-D parameters and biases. The scripts set the rate to 0.85.
  This is ``param_groups_lrd`` with an empty no-decay list: the official check compares
  ``"pos_embed"`` / ``"cls_token"`` with full names (``backbone.pos_embed``), never matches,
  and so decays them too; we keep that.
- ``configs/linear_probing/linear_vit_*``: backbone ``VisionTransformer`` with
  ``frozen_stages=depth`` (frozen, eval mode) and ``with_fpn=False``; patch tokens of the
  0-based blocks ``[3, 5, 7, 11]`` (``[7, 11, 15, 23]`` for 24 blocks), no norm;
  ``FCNHead(num_convs=0, input_transform="resize_concat")``: bilinear resize to the first
  map, concatenation, then one 1x1 conv (no BatchNorm, no dropout). Same AdamW, plain
  (no layer decay, weight decay on every parameter), same poly schedule and slide inference.
- mmseg 0.11 ``EncoderDecoder.slide_inference`` / ``whole_inference``,
  ``core/evaluation/metrics.py`` (intersection and union summed over the test set,
  ``nanmean`` of per-class IoU, aAcc = correct / labelled pixels) and ``CrossEntropyLoss``
  (per-pixel loss, 0 at ignored pixels, mean over all pixels: ``avg_non_ignore`` did not
  exist yet); mmcv 1.3 ``PolyLrUpdaterHook`` with linear warmup.

The model is trained in place: ``run_segmentation`` does not copy the backbone, so the
caller passes a fresh copy. Fine-tuning replaces ``backbone.norm`` by ``Identity`` (unused,
as with ``use_norm=False``) and re-sets drop path; the linear probe freezes the backbone.
The backbone is a timm ``VisionTransformer``; a crop of another size than the backbone's
``img_size`` needs one built with ``dynamic_img_size=True``.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from timm.layers import DropPath
from torch import Tensor, nn
from torchmetrics.classification import MulticlassConfusionMatrix
from torchmetrics.functional.classification import multiclass_confusion_matrix

from visionbench.data.batch import unpack
from visionbench.distributed import rank_local
from visionbench.errors import ConfigError
from visionbench.evals.finetune import param_groups_lrd
from visionbench.methods.schedule import ensure_trained, set_lr
from visionbench.results.bootstrap import encode_confusion, with_samples

IGNORE_INDEX = 255
PROTOCOLS = ("finetune", "linear")
HEADS = ("upernet", "fpn")
INFERENCE = ("slide", "whole")
MIN_INPUT = 32
SEGMENTATION_DEFAULTS = {
    "epochs": None,
    "max_steps": None,
    "lr": 1e-4,
    "weight_decay": 0.05,
    "betas": (0.9, 0.999),
    "layer_decay": 0.85,
    "drop_path": 0.1,
    "poly_power": 1.0,
    "min_lr": 0.0,
    "warmup_steps": None,
    "warmup_fraction": 0.1,
    "warmup_ratio": 1e-6,
    "head": "upernet",
    "channels": None,
    "pool_scales": (1, 2, 3, 6),
    "aux_weight": 0.4,
    "aux_channels": 256,
    "dropout": 0.1,
    "probe_blocks": None,
    "inference": "slide",
    "crop": 512,
    "stride": 341,
    "ignore_index": IGNORE_INDEX,
    "seed": None,
}


def probe_blocks(depth: int) -> list[int]:
    """0-based blocks read by the linear probe: ``depth/3 - 1, depth/2 - 1, 2*depth/3 - 1,
    depth - 1``, i.e. the official ``[3, 5, 7, 11]`` for 12 blocks and ``[7, 11, 15, 23]``
    for 24; other depths get the same fractions (rounded), ending at the last block."""
    if depth < 1:
        raise ConfigError(f"probe_blocks: depth must be >= 1, got {depth}")
    picks = [max(round(depth * part) - 1, 0) for part in (1 / 3, 1 / 2, 2 / 3, 1)]
    return sorted(set(picks))


def set_drop_path(backbone: nn.Module, rate: float) -> None:
    """Stochastic depth ``linspace(0, rate, depth)`` over the blocks of a timm ViT, the rule of
    timm and of the official backbone; replaces each block's ``drop_path1`` / ``drop_path2``."""
    rates = torch.linspace(0, rate, len(backbone.blocks)).tolist()
    for block, block_rate in zip(backbone.blocks, rates, strict=True):
        for name in ("drop_path1", "drop_path2"):
            if hasattr(block, name):
                setattr(block, name, DropPath(block_rate) if block_rate > 0 else nn.Identity())


def resize(x: Tensor, size: Sequence[int]) -> Tensor:
    """mmseg's ``resize`` as the heads use it: bilinear, ``align_corners=False``."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int) -> nn.Sequential:
    """mmcv ``ConvModule`` with BN and ReLU: bias-free conv, kaiming(fan_out) init."""
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return nn.Sequential(conv, nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


def classifier(channels: int, num_classes: int, dropout: float) -> nn.Sequential:
    """mmseg ``cls_seg``: Dropout2d then a 1x1 conv with weight normal(0, 0.01), bias 0."""
    conv = nn.Conv2d(channels, num_classes, 1)
    nn.init.normal_(conv.weight, std=0.01)
    nn.init.zeros_(conv.bias)
    return nn.Sequential(nn.Dropout2d(dropout) if dropout > 0 else nn.Identity(), conv)


class LLFPN(nn.Module):
    """Last-layer feature pyramid: one (B, C, H/p, W/p) map to four at strides 4, 8, 16, 32
    of the input (x4, x2, x1, x0.5 of the token grid for patch 16), all with C channels."""

    def __init__(self, dim: int, patch_size: int = 16) -> None:
        super().__init__()

        def up() -> nn.ConvTranspose2d:
            return nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2)

        if patch_size == 16:
            scales = [nn.Sequential(up(), nn.BatchNorm2d(dim), nn.GELU(), up()), up(),
                      nn.Identity(), nn.MaxPool2d(kernel_size=2, stride=2)]
        elif patch_size == 8:
            scales = [up(), nn.Identity(), nn.MaxPool2d(kernel_size=2, stride=2),
                      nn.MaxPool2d(kernel_size=4, stride=4)]
        else:
            raise ConfigError(f"LL-FPN: patch size must be 16 or 8 (as the official code), "
                              f"got {patch_size}")
        self.scales = nn.ModuleList(scales)

    def forward(self, feature: Tensor) -> list[Tensor]:
        return [scale(feature) for scale in self.scales]


class UperNetHead(nn.Module):
    """mmseg ``UPerHead``: a pyramid pooling module on the coarsest map, 1x1 lateral convs,
    a top-down pathway, 3x3 FPN convs, all levels resized to the finest and fused by a 3x3
    conv, then the classifier. Logits at the finest level's resolution."""

    def __init__(self, in_channels: Sequence[int], channels: int, num_classes: int,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1) -> None:
        super().__init__()
        top = in_channels[-1]
        self.ppm = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(scale), conv_bn_relu(top, channels, 1))
            for scale in pool_scales)
        self.bottleneck = conv_bn_relu(top + len(pool_scales) * channels, channels, 3)
        self.lateral_convs = nn.ModuleList(conv_bn_relu(c, channels, 1) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(conv_bn_relu(channels, channels, 3)
                                       for _ in in_channels[:-1])
        self.fpn_bottleneck = conv_bn_relu(len(in_channels) * channels, channels, 3)
        self.classifier = classifier(channels, num_classes, dropout)

    def pyramid_pooling(self, top: Tensor) -> Tensor:
        pooled = [resize(stage(top), top.shape[-2:]) for stage in self.ppm]
        return self.bottleneck(torch.cat([top, *pooled], dim=1))

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, features[:-1], strict=True)]
        laterals.append(self.pyramid_pooling(features[-1]))
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + resize(laterals[i], laterals[i - 1].shape[-2:])
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals[:-1], strict=True)]
        outs.append(laterals[-1])
        size = outs[0].shape[-2:]
        fused = self.fpn_bottleneck(torch.cat([resize(x, size) for x in outs], dim=1))
        return self.classifier(fused)


class FPNHead(nn.Module):
    """A lighter head for demo sizes (not in the paper): 1x1 laterals, top-down sum, one 3x3
    conv on the finest level, classifier."""

    def __init__(self, in_channels: Sequence[int], channels: int, num_classes: int,
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.lateral_convs = nn.ModuleList(conv_bn_relu(c, channels, 1) for c in in_channels)
        self.fuse = conv_bn_relu(channels, channels, 3)
        self.classifier = classifier(channels, num_classes, dropout)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, features, strict=True)]
        x = laterals[-1]
        for lateral in reversed(laterals[:-1]):
            x = lateral + resize(x, lateral.shape[-2:])
        return self.classifier(self.fuse(x))


class FCNHead(nn.Module):
    """mmseg ``FCNHead`` as UNIP's auxiliary head: one 3x3 conv-BN-ReLU, classifier."""

    def __init__(self, in_channels: int, channels: int, num_classes: int,
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.conv = conv_bn_relu(in_channels, channels, 3)
        self.classifier = classifier(channels, num_classes, dropout)

    def forward(self, feature: Tensor) -> Tensor:
        return self.classifier(self.conv(feature))


def vit_patch_size(backbone: nn.Module) -> int:
    return int(backbone.patch_embed.patch_size[0])


def check_vit(backbone: nn.Module) -> None:
    if not (hasattr(backbone, "blocks") and hasattr(backbone, "forward_intermediates")):
        raise ConfigError("segmentation: the backbone must be a timm VisionTransformer "
                          f"(blocks + forward_intermediates), got {type(backbone).__name__}")


class SegmentationModel(nn.Module):
    """ViT + LL-FPN + UperNet (or the light FPN) head, with UNIP's auxiliary FCN head on the
    stride-16 level. ``forward`` gives logits (B, num_classes, H, W) at the input size."""

    def __init__(self, backbone: nn.Module, num_classes: int, head: str = "upernet",
                 channels: int | None = None, pool_scales: Sequence[int] = (1, 2, 3, 6),
                 aux: bool = True, aux_channels: int = 256, dropout: float = 0.1) -> None:
        super().__init__()
        check_vit(backbone)
        if head not in HEADS:
            raise ConfigError(f"segmentation: unknown head {head!r}; allowed: {', '.join(HEADS)}")
        self.num_classes = num_classes
        self.backbone = backbone
        backbone.norm = nn.Identity()  # never applied (use_norm=False); no unused params in DDP
        self.last_block = len(backbone.blocks) - 1
        dim = backbone.embed_dim
        channels = channels or dim
        self.neck = LLFPN(dim, vit_patch_size(backbone))
        if head == "upernet":
            self.decode_head = UperNetHead([dim] * 4, channels, num_classes, pool_scales, dropout)
        else:
            self.decode_head = FPNHead([dim] * 4, channels, num_classes, dropout)
        self.aux_head = FCNHead(dim, aux_channels, num_classes, dropout) if aux else None

    def pyramid(self, images: Tensor) -> list[Tensor]:
        if min(images.shape[-2:]) < MIN_INPUT:
            raise ConfigError(f"segmentation: inputs (crops) must be at least {MIN_INPUT} px, "
                              f"the stride of LL-FPN's coarsest level; got "
                              f"{tuple(images.shape[-2:])}")
        last = self.backbone.forward_intermediates(images, indices=[self.last_block], norm=False,
                                                   intermediates_only=True)[0]
        return self.neck(last)

    def forward_with_aux(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        features = self.pyramid(images)
        size = images.shape[-2:]
        logits = resize(self.decode_head(features), size)
        aux = resize(self.aux_head(features[2]), size) if self.aux_head is not None else None
        return logits, aux

    def forward(self, images: Tensor) -> Tensor:
        return resize(self.decode_head(self.pyramid(images)), images.shape[-2:])


class LinearProbeModel(nn.Module):
    """A frozen ViT (eval mode, no gradients) whose patch-token maps at ``blocks`` are resized
    to the first one, concatenated and classified by one 1x1 conv."""

    def __init__(self, backbone: nn.Module, num_classes: int,
                 blocks: Sequence[int] | None = None) -> None:
        super().__init__()
        check_vit(backbone)
        depth = len(backbone.blocks)
        self.blocks = list(blocks) if blocks is not None else probe_blocks(depth)
        if not self.blocks or any(not 0 <= b < depth for b in self.blocks):
            raise ConfigError(f"linear probe: blocks must be 0-based indices below {depth}, "
                              f"got {self.blocks}")
        self.num_classes = num_classes
        self.backbone = backbone.requires_grad_(False).eval()
        self.classifier = classifier(backbone.embed_dim * len(self.blocks), num_classes, 0.0)

    def train(self, mode: bool = True) -> LinearProbeModel:
        super().train(mode)
        self.backbone.eval()  # frozen_stages: the backbone never leaves eval mode
        return self

    def features(self, images: Tensor) -> Tensor:
        with torch.no_grad():
            maps = self.backbone.forward_intermediates(images, indices=self.blocks, norm=False,
                                                       stop_early=True, intermediates_only=True)
        size = maps[0].shape[-2:]
        return torch.cat([resize(m, size) for m in maps], dim=1)

    def forward_with_aux(self, images: Tensor) -> tuple[Tensor, None]:
        return self(images), None

    def forward(self, images: Tensor) -> Tensor:
        return resize(self.classifier(self.features(images)), images.shape[-2:])


def poly_lr(step: int, base_lr: float, total_steps: int, power: float = 1.0,
            min_lr: float = 0.0, warmup_steps: int = 0, warmup_ratio: float = 1e-6) -> float:
    """mmcv 1.3 ``PolyLrUpdaterHook`` by iteration, with its linear warmup applied on top:
    ``poly = (base - min) * (1 - step / total) ** power + min``; for ``step < warmup_steps``
    the lr is ``poly * (1 - (1 - step / warmup_steps) * (1 - warmup_ratio))``."""
    progress = min(step / max(total_steps, 1), 1.0)
    lr = (base_lr - min_lr) * (1.0 - progress) ** power + min_lr
    if step < warmup_steps:
        lr *= 1.0 - (1.0 - step / warmup_steps) * (1.0 - warmup_ratio)
    return lr


def segmentation_loss(logits: Tensor, target: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """mmseg 0.11 ``CrossEntropyLoss``: per-pixel cross-entropy, 0 at ignored pixels, averaged
    over every pixel (a batch with only ignored pixels gives 0, not NaN)."""
    loss = F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="none")
    return loss.mean()


def pair(value: int | Sequence[int]) -> tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, int) else (int(value[0]), int(value[1]))


def slide_inference(model: Callable[[Tensor], Tensor], image: Tensor,
                    crop: int | Sequence[int], stride: int | Sequence[int],
                    num_classes: int) -> Tensor:
    """mmseg's ``slide_inference``: windows of ``crop`` every ``stride`` (the last one shifted
    back to end at the border; the whole image when it is smaller than the crop), each
    window's logits summed into place and divided by how many windows cover each pixel."""
    (crop_h, crop_w), (stride_h, stride_w) = pair(crop), pair(stride)
    batch, _, height, width = image.shape
    rows = max(height - crop_h + stride_h - 1, 0) // stride_h + 1
    cols = max(width - crop_w + stride_w - 1, 0) // stride_w + 1
    logits = image.new_zeros((batch, num_classes, height, width), dtype=torch.float32)
    count = image.new_zeros((batch, 1, height, width), dtype=torch.float32)
    for row in range(rows):
        for col in range(cols):
            y2, x2 = min(row * stride_h + crop_h, height), min(col * stride_w + crop_w, width)
            y1, x1 = max(y2 - crop_h, 0), max(x2 - crop_w, 0)
            logits[:, :, y1:y2, x1:x2] += model(image[:, :, y1:y2, x1:x2]).float()
            count[:, :, y1:y2, x1:x2] += 1
    return logits / count


def scores_from_confmat(confmat: Tensor) -> dict:
    """mmseg's metrics from a summed confusion matrix (rows: label, columns: prediction):
    per-class IoU = intersection / union, mIoU = mean over classes with union > 0 (mmseg's
    ``nanmean``), aAcc = correct / labelled pixels. All in percent; an absent class (union 0)
    has IoU ``None``."""
    confmat = confmat.double()
    intersection = confmat.diag()
    union = confmat.sum(0) + confmat.sum(1) - intersection
    iou = intersection / union  # NaN where union == 0
    present = union > 0
    miou = float(iou[present].mean() * 100) if present.any() else float("nan")
    labelled = confmat.sum()
    pixel_acc = float(intersection.sum() / labelled * 100) if labelled > 0 else float("nan")
    per_class = [float(v * 100) if ok else None for v, ok in zip(iou, present, strict=True)]
    return {"miou": miou, "per_class_iou": per_class, "pixel_acc": pixel_acc}


def per_image_confusion(preds: Tensor, targets: Tensor, num_classes: int,
                        ignore_index: int = IGNORE_INDEX) -> Tensor:
    """One confusion matrix per image, (B, C, C) int64 (rows: label, columns: prediction),
    of label maps ``preds`` and ``targets`` (B, H, W); pixels at ``ignore_index`` (or with a
    label outside [0, C)) left out. Their sum over images is the test set's matrix."""
    batch = targets.shape[0]
    preds, targets = preds.reshape(batch, -1).long(), targets.reshape(batch, -1).long()
    valid = (targets != ignore_index) & (targets >= 0) & (targets < num_classes)
    image = torch.arange(batch, device=targets.device)[:, None].expand_as(targets)
    cell = (image * num_classes + targets) * num_classes + preds.clamp(0, num_classes - 1)
    counts = torch.bincount(cell[valid], minlength=batch * num_classes * num_classes)
    return counts.reshape(batch, num_classes, num_classes)


def segmentation_metrics(preds: Tensor, targets: Tensor, num_classes: int,
                         ignore_index: int = IGNORE_INDEX) -> dict:
    """mIoU, per-class IoU and pixel accuracy (percent) of ``preds`` (labels (B, H, W) or
    logits (B, C, H, W)) against ``targets`` (B, H, W), pixels at ``ignore_index`` left out.

    The confusion matrix is torchmetrics'; its ``JaccardIndex(average="macro")`` leaves out
    classes with union 0 exactly like mmseg's nanmean, but ``average="none"`` reports them as
    0, so the per-class values are computed here from the matrix."""
    if preds.ndim == targets.ndim + 1:
        preds = preds.argmax(dim=1)
    confmat = multiclass_confusion_matrix(preds, targets, num_classes, ignore_index=ignore_index)
    return scores_from_confmat(confmat)


class SegmentationFineTuner(L.LightningModule):
    """Trains a ``SegmentationModel`` (fine-tuning, ``layer_decay`` set) or a
    ``LinearProbeModel`` (``layer_decay=None``: one AdamW group, weight decay everywhere)
    under the mmcv poly schedule with linear warmup, set every optimizer step; tests with
    ``slide`` or ``whole`` inference and accumulates a confusion matrix over the test set."""

    def __init__(self, model: nn.Module, num_classes: int, lr: float = 1e-4,
                 weight_decay: float = 0.05, betas: Sequence[float] = (0.9, 0.999),
                 layer_decay: float | None = 0.85, poly_power: float = 1.0, min_lr: float = 0.0,
                 warmup_steps: int | None = None, warmup_fraction: float = 0.1,
                 warmup_ratio: float = 1e-6, aux_weight: float = 0.4, inference: str = "slide",
                 crop: int | Sequence[int] = 512, stride: int | Sequence[int] = 341,
                 ignore_index: int = IGNORE_INDEX) -> None:
        super().__init__()
        if inference not in INFERENCE:
            raise ConfigError(f"segmentation: unknown inference {inference!r}; "
                              f"allowed: {', '.join(INFERENCE)}")
        self.save_hyperparameters(ignore=["model"])
        self.model = model
        self.test_confmat = MulticlassConfusionMatrix(num_classes, ignore_index=ignore_index)
        self.test_scores: dict | None = None
        # per-image matrices of the running test, each kept as its sparse text at once
        self.test_confusions: list[str] = []
        self.test_samples: dict | None = None  # their "samples" record, after a test
        self.total_steps = 0
        self.warmup_steps = 0

    def forward(self, images: Tensor) -> Tensor:
        return self.model(images)

    def predict_logits(self, images: Tensor) -> Tensor:
        hp = self.hparams
        if hp.inference == "slide":
            return slide_inference(self.model, images, hp.crop, hp.stride, hp.num_classes)
        return self.model(images)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        hp = self.hparams
        if hp.layer_decay is None:
            params = [p for p in self.model.parameters() if p.requires_grad]
            groups = [{"params": params, "weight_decay": hp.weight_decay}]
        else:
            groups = param_groups_lrd(self.model, hp.weight_decay, hp.layer_decay)
        return torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas))

    def lr_warmup_steps(self) -> int:
        hp = self.hparams
        if hp.warmup_steps is not None:
            return int(hp.warmup_steps)
        return round(hp.warmup_fraction * int(self.trainer.estimated_stepping_batches))

    def on_train_start(self) -> None:
        self.total_steps = int(self.trainer.estimated_stepping_batches)
        self.warmup_steps = self.lr_warmup_steps()

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        hp = self.hparams
        lr = poly_lr(self.trainer.global_step, hp.lr, self.total_steps, hp.poly_power,
                     hp.min_lr, self.warmup_steps, hp.warmup_ratio)
        for optimizer in self.trainer.optimizers:
            set_lr(optimizer, lr)

    def training_step(self, batch, batch_idx: int) -> Tensor:
        images, masks = unpack(batch, "image", "mask")
        logits, aux = self.model.forward_with_aux(images)
        loss = segmentation_loss(logits, masks, self.hparams.ignore_index)
        if aux is not None and self.hparams.aux_weight > 0:
            loss = loss + self.hparams.aux_weight * segmentation_loss(
                aux, masks, self.hparams.ignore_index)
        self.log("train_loss", loss, on_step=False, on_epoch=True, prog_bar=True,
                 batch_size=images.shape[0], sync_dist=True)
        return loss

    def test_step(self, batch, batch_idx: int) -> None:
        """Logits resized (bilinear) to the label's size before the argmax: scores at the
        original label resolution, as mmseg's ``rescale=True`` to ``ori_shape``."""
        images, masks = unpack(batch, "image", "mask")
        logits = resize(self.predict_logits(images), masks.shape[-2:])
        preds = logits.argmax(dim=1)
        self.test_confmat.update(preds, masks)
        matrices = per_image_confusion(preds, masks, self.hparams.num_classes,
                                       self.hparams.ignore_index).cpu().numpy()
        self.test_confusions += [encode_confusion(matrix) for matrix in matrices]

    def on_test_epoch_start(self) -> None:
        self.test_confusions = []

    def on_test_epoch_end(self) -> None:
        if self.test_confusions:
            self.test_samples = {"kind": "confusion", "num_classes": self.hparams.num_classes,
                                 "confusion": self.test_confusions}
        self.test_confusions = []
        self.test_scores = scores_from_confmat(self.test_confmat.compute())
        self.log("test_miou", self.test_scores["miou"])
        self.log("test_pixel_acc", self.test_scores["pixel_acc"])
        self.test_confmat.reset()


@torch.no_grad()
def predict_masks(model: nn.Module, images: Tensor, inference: str = "whole",
                  crop: int | Sequence[int] = 512, stride: int | Sequence[int] = 341) -> Tensor:
    """Predicted label maps (B, H, W) on the CPU, for figures. ``model`` is a
    ``SegmentationModel`` / ``LinearProbeModel`` (``inference`` chooses the path) or a
    ``SegmentationFineTuner`` (its own inference settings). The model's mode is restored."""
    if inference not in INFERENCE:
        raise ConfigError(f"predict_masks: unknown inference {inference!r}")
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        images = images.to(device)
        if isinstance(model, SegmentationFineTuner):
            logits = model.predict_logits(images)
        elif inference == "slide":
            logits = slide_inference(model, images, crop, stride, model.num_classes)
        else:
            logits = model(images)
    finally:
        model.train(was_training)
    return logits.argmax(dim=1).cpu()


def segmentation_config(cfg: dict, protocol: str) -> dict:
    """``cfg`` with the official defaults filled in; a bad key or value is a ConfigError."""
    if protocol not in PROTOCOLS:
        raise ConfigError(f"segmentation: unknown protocol {protocol!r}; "
                          f"allowed: {', '.join(PROTOCOLS)}")
    unknown = sorted(set(cfg) - set(SEGMENTATION_DEFAULTS))
    if unknown:
        raise ConfigError(f"segmentation: unknown key(s) {unknown}; "
                          f"expected some of {sorted(SEGMENTATION_DEFAULTS)}")
    cfg = {**SEGMENTATION_DEFAULTS, **cfg}
    if cfg["epochs"] is None and cfg["max_steps"] is None:
        raise ConfigError("segmentation: set 'epochs' or 'max_steps'")
    if cfg["head"] not in HEADS:
        raise ConfigError(f"segmentation: unknown head {cfg['head']!r}; "
                          f"allowed: {', '.join(HEADS)}")
    if cfg["inference"] not in INFERENCE:
        raise ConfigError(f"segmentation: unknown inference {cfg['inference']!r}; "
                          f"allowed: {', '.join(INFERENCE)}")
    return cfg


def build_segmentation_model(backbone: nn.Module, num_classes: int, protocol: str,
                             cfg: dict) -> nn.Module:
    """The protocol's model around ``backbone`` (modified in place)."""
    if protocol == "linear":
        return LinearProbeModel(backbone, num_classes, cfg["probe_blocks"])
    check_vit(backbone)
    if cfg["drop_path"] is not None:
        set_drop_path(backbone, cfg["drop_path"])
    return SegmentationModel(backbone, num_classes, head=cfg["head"], channels=cfg["channels"],
                             pool_scales=tuple(cfg["pool_scales"]), aux=cfg["aux_weight"] > 0,
                             aux_channels=cfg["aux_channels"], dropout=cfg["dropout"])


def read_loss_history(metrics_csv: Path) -> list[dict]:
    """Per-epoch ``train_loss`` from the CSVLogger's ``metrics.csv``."""
    if not metrics_csv.exists():
        return []
    history = {}
    with metrics_csv.open(newline="") as handle:
        for row in csv.DictReader(handle):
            if row.get("epoch") and row.get("train_loss"):
                history[int(float(row["epoch"]))] = float(row["train_loss"])
    return [{"epoch": epoch, "train_loss": history[epoch]} for epoch in sorted(history)]


def run_segmentation(backbone: nn.Module, train_loader, test_loader, num_classes: int,
                     protocol: str = "finetune", cfg: dict | None = None,
                     out_dir: Path | str = ".", trainer_kwargs: dict | None = None,
                     keep_model: bool = False, callbacks: tuple = (),
                     keep_samples: bool = True,
                     test_trainer_kwargs: dict | None = None) -> dict | None:
    """Train a segmentation protocol on ``backbone`` (in place: pass a fresh copy), then test.

    ``test_trainer_kwargs``: ``trainer_kwargs`` may fit on several processes (DDP; pass
    ``sync_batchnorm`` there for mmseg's ``SyncBN`` heads), and the test runs on rank 0 alone
    on a trainer of these (one device) over the whole test set; the other ranks return None.

    Batches are ``(image (B, 3, H, W) normalized float, mask (B, H, W) long, 255 = ignore)``.
    ``cfg`` keys and defaults: ``SEGMENTATION_DEFAULTS`` (``epochs`` or ``max_steps`` is
    required; the schedule spans the trainer's total optimizer steps). Returns ``{"miou",
    "per_class_iou", "pixel_acc"}`` in percent (absent classes ``None``), ``"epochs"`` and
    ``"steps"`` run, ``"history"`` of per-epoch train loss, and with ``keep_model`` the
    trained model under ``"model"`` (not JSON-serializable). With ``keep_samples`` (the
    default) also the per-image test confusion matrices, ``"samples": {"kind": "confusion",
    "num_classes", "confusion": ["label*C+pred:count ...", ...]}``, and the 95% bootstrap
    intervals over test images of mIoU and pixel accuracy, ``"ci": {"miou": [low, high],
    "pixel_acc": [low, high]}`` (1,000 resamples seeded by ``cfg["seed"]``, 0 when None;
    ``visionbench.results.bootstrap``).
    """
    cfg = segmentation_config(dict(cfg or {}), protocol)
    out_dir = Path(out_dir)
    if cfg["seed"] is not None:
        L.seed_everything(cfg["seed"], workers=True, verbose=False)
    model = build_segmentation_model(backbone, num_classes, protocol, cfg)
    module = SegmentationFineTuner(
        model, num_classes, lr=cfg["lr"], weight_decay=cfg["weight_decay"],
        betas=tuple(cfg["betas"]), layer_decay=cfg["layer_decay"] if protocol == "finetune"
        else None, poly_power=cfg["poly_power"], min_lr=cfg["min_lr"],
        warmup_steps=cfg["warmup_steps"], warmup_fraction=cfg["warmup_fraction"],
        warmup_ratio=cfg["warmup_ratio"], aux_weight=cfg["aux_weight"],
        inference=cfg["inference"], crop=cfg["crop"], stride=cfg["stride"],
        ignore_index=cfg["ignore_index"])
    logger = CSVLogger(out_dir, name=f"segmentation_{protocol}")
    trainer_kwargs = dict(trainer_kwargs or {})
    callbacks = [*callbacks, *trainer_kwargs.pop("callbacks", [])]
    trainer = L.Trainer(max_epochs=cfg["epochs"] if cfg["epochs"] is not None else -1,
                        max_steps=cfg["max_steps"] if cfg["max_steps"] is not None else -1,
                        default_root_dir=out_dir, logger=logger, enable_checkpointing=False,
                        callbacks=callbacks, **trainer_kwargs)
    trainer.fit(module, train_dataloaders=train_loader)
    ensure_trained(trainer, f"segmentation {protocol}")
    if test_trainer_kwargs is None:
        trainer.test(module, dataloaders=test_loader, verbose=False)
    elif trainer.global_rank != 0:
        return None
    else:
        tester = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                           **test_trainer_kwargs)
        with rank_local(module):
            tester.test(module, dataloaders=test_loader, verbose=False)
    result = {
        **module.test_scores,
        "epochs": int(trainer.current_epoch),
        "steps": int(trainer.global_step),
        "history": read_loss_history(Path(logger.log_dir) / "metrics.csv"),
    }
    if keep_samples and module.test_samples is not None:
        with_samples(result, module.test_samples, cfg["seed"])
    if keep_model:
        result["model"] = model.eval()
    return result


__all__ = [
    "FCNHead",
    "FPNHead",
    "LLFPN",
    "LinearProbeModel",
    "SEGMENTATION_DEFAULTS",
    "SegmentationFineTuner",
    "SegmentationModel",
    "UperNetHead",
    "per_image_confusion",
    "poly_lr",
    "predict_masks",
    "probe_blocks",
    "run_segmentation",
    "scores_from_confmat",
    "segmentation_loss",
    "segmentation_metrics",
    "set_drop_path",
    "slide_inference",
]
