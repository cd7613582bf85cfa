"""Object-detection transfer: Faster R-CNN on a pretrained ResNet, as PixPro reports it.

PixPro (arXiv 2011.10043) fine-tunes with detectron2 0.2.1; its configs are
zdaxie/PixPro ``transfer/detection/configs/``. What is followed here, through torchvision's
``FasterRCNN``:

- ``Pascal_VOC_R_50_C4_24k(_PixPro).yaml`` (the VOC numbers of the paper, on
  ``Base-RCNN-C4-BN.yaml``): SGD, base lr 0.02 at 16 images a batch, 24k iterations, lr x0.1
  at 18k and 22k, linear warmup over 100 iterations from 0.001 x lr (detectron2's
  ``WARMUP_FACTOR``); training min sides ``(480, 512, ..., 800)`` drawn per batch, max 1333;
  test min side 800; ``FREEZE_AT: 0`` (every stage trained, stem included); ``NORM:
  SyncBN`` in the backbone and the res5 head; ``Res5ROIHeadsExtraNorm`` (a BN after res5,
  "as described in the MoCo paper"); ``TEST.PRECISE_BN`` (BN statistics recomputed before
  testing, detectron2's 200 iterations); RPN top-k 6000 / 1000 at test; RGB input normalized
  by the ImageNet mean / std (``PIXEL_MEAN`` / ``PIXEL_STD`` in 0-255); ``STRIDE_IN_1X1:
  False`` (the stride in the 3x3 conv, as timm's and torchvision's ResNets have it).
  ``arch="c4"`` builds this: RPN on res4 (anchors 32-512, ratios 0.5 / 1 / 2, one level),
  14 x 14 RoIAlign, the backbone's own ``layer4`` as the box head, then the extra BN and
  average pooling.
- ``COCO_R_50_FPN_1x.yaml`` (on ``Base-RCNN-FPN.yaml``; the paper's FPN numbers, COCO):
  ``arch="fpn"``, the default here: ``layer1..layer4`` into an FPN (256 channels, P2-P6
  with P6 a stride-2 max pool of P5), one anchor size a level (32, 64, 128, 256, 512),
  RPN top-k 2000 (per level) / 1000 (per image) in training and 1000 / 1000 at test, 7 x 7
  RoIAlign over P2-P5, and with SyncBN the "4conv1fc" box head (four 3x3 conv-BN-ReLU then
  one 1024-d FC) and BN in the FPN; the VOC schedule and sizes above are kept.
- detectron2 defaults both configs inherit: RPN 256 anchors an image (half positive),
  IoU 0.3 / 0.7, NMS 0.7; 512 RoIs an image (a quarter positive), IoU 0.5; box regression
  weights (10, 10, 5, 5); test score threshold 0.05, NMS 0.5, 100 detections; momentum 0.9,
  weight decay 1e-4 on every parameter except those of norm layers (``WEIGHT_DECAY_NORM:
  0``), biases at the full lr; horizontal flip with p = 0.5; images without boxes left out
  of training; classifier init N(0, 0.01), box regressor N(0, 0.001), FC layers
  ``c2_xavier_fill``; test batches of one image a GPU.

``norm="frozen"`` gives detectron2's own default instead (``Base-RCNN-FPN.yaml`` with
``FrozenBN`` and ``FREEZE_AT: 2``): frozen BN statistics and affine parameters in the
backbone, the stem and ``layer1`` not trained, no norm in the FPN, the "2fc" box head, no
extra BN after res5.

Deviations (torchvision cannot, or this harness does not, do it as detectron2 does):

- "SyncBN" is torch's SyncBatchNorm only on several CUDA processes; on one process, or CPU
  processes (gloo), it is BatchNorm over each process's images of the step.
- Box losses are torchvision's smooth-L1 with beta 1/9 (detectron2 0.2: L1, beta 0).
- RoIAlign is torchvision's ``MultiScaleRoIAlign`` (``aligned=False``; detectron2's
  ``ROIAlignV2`` is ``aligned=True``), with ``sampling_ratio=0`` as detectron2.
- No aspect-ratio grouping of batches; images are padded to the batch's largest (stride 32).
- Metrics are torchmetrics' ``MeanAveragePrecision`` (pycocotools backend: COCO's 101-point
  interpolated AP, up to 100 detections an image), not detectron2's
  ``PascalVOCDetectionEvaluator`` (VOC07 11-point AP): AP is the mean over IoU 0.50:0.95,
  AP50 and AP75 at one threshold. VOC "difficult" objects go in as COCO ``iscrowd``: a
  detection matched to one counts neither way, as in VOC, but COCO matches crowd regions by
  intersection over the detection's area rather than IoU.
- For images smaller than VOC's, ``image_size`` (the test min side) rescales the training
  sizes and the max side by ``image_size / 800``; the lr scales linearly with the batch
  (0.02 x batch / 16); warmup and lr steps keep their fractions of the schedule.

The backbone is a timm ``ResNet`` (``conv1 / bn1 / act1 / maxpool / layer1..layer4``) and is
trained in place: pass a fresh copy.
"""

from __future__ import annotations

import bisect
import contextlib
import io
import itertools
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from timm.layers import convert_sync_batchnorm, freeze_batch_norm_2d
from torch import Tensor, nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Sampler, Subset
from torchmetrics.detection import MeanAveragePrecision
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import (
    FastRCNNConvFCHead,
    FastRCNNPredictor,
    TwoMLPHead,
)
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.transforms.functional import pil_to_tensor

from visionbench.distributed import rank_local
from visionbench.errors import ConfigError, DataError

ARCHS = ("fpn", "c4")
NORMS = ("syncbn", "frozen")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Pascal_VOC_R_50_C4_24k.yaml
VOC_TRAIN_SIZES = tuple(range(480, 801, 32))
REFERENCE_TEST_SIZE = 800
REFERENCE_MAX_SIZE = 1333
REFERENCE_BATCH = 16
REFERENCE_LR = 0.02
REFERENCE_STEPS = 24000
REFERENCE_LR_STEPS = (18000, 22000)
REFERENCE_WARMUP = 100
STAGES = ("layer1", "layer2", "layer3", "layer4")
LOSS_KEYS = ("loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg")
NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)

DETECTION_DEFAULTS: dict[str, Any] = {
    "arch": "fpn",
    "norm": "syncbn",
    "image_size": REFERENCE_TEST_SIZE,
    "train_sizes": None,  # VOC's 480..800, scaled by image_size / 800
    "max_size": None,  # 1333, scaled by image_size / 800
    "epochs": None,
    "max_steps": None,
    "batch_size": REFERENCE_BATCH,
    "lr": None,  # 0.02 * batch_size / 16
    "momentum": 0.9,
    "weight_decay": 1e-4,
    "weight_decay_norm": 0.0,
    "lr_decay_at": tuple(s / REFERENCE_STEPS for s in REFERENCE_LR_STEPS),
    "gamma": 0.1,
    "warmup_steps": None,  # 100 / 24000 of the schedule
    "warmup_factor": 1e-3,
    "trainable_layers": None,  # 5 (FREEZE_AT 0) with syncbn, 3 (FREEZE_AT 2) with frozen
    "precise_bn_iters": 200,
    "hflip": True,
    "fpn_channels": 256,
    "box_fc_dim": 1024,
    "rpn_batch_size": 256,
    "roi_batch_size": 512,
    "eval_batch_size": 1,
    "mean": IMAGENET_MEAN,
    "std": IMAGENET_STD,
    "seed": 0,
    "device": "cpu",
    "num_workers": 0,
    "log_every": 20,
}


# ----------------------------------------------------------------------------- model


def check_resnet(backbone: nn.Module) -> None:
    names = {name for name, _ in backbone.named_children()}
    missing = [n for n in ("conv1", "bn1", "maxpool", *STAGES) if n not in names]
    if missing:
        raise ConfigError(
            f"detection: the backbone must be a timm ResNet (conv1, bn1, act1, maxpool, "
            f"layer1..layer4); {type(backbone).__name__} has no {', '.join(missing)}")


def stage_channels(backbone: nn.Module) -> dict[str, int]:
    """Output channels of ``layer1..layer4`` (timm's ``feature_info``, else a probe)."""
    info = getattr(backbone, "feature_info", None)
    if info:
        found = {i["module"]: int(i["num_chs"]) for i in info if i.get("module") in STAGES}
        if len(found) == len(STAGES):
            return found
    body = IntermediateLayerGetter(backbone, {s: s for s in STAGES})
    was_training = backbone.training
    backbone.eval()
    with torch.no_grad():
        out = body(torch.zeros(1, 3, 64, 64, device=next(backbone.parameters()).device))
    backbone.train(was_training)
    return {s: int(out[s].shape[1]) for s in STAGES}


def freeze_stages(backbone: nn.Module, trainable_layers: int) -> None:
    """torchvision's ``trainable_layers`` (detectron2's ``FREEZE_AT = 5 - trainable``): the
    ``5 - trainable_layers`` lowest of (stem, layer1, ..., layer4) get no gradients and their
    BN becomes ``FrozenBatchNorm2d``, as detectron2 freezes a stage."""
    if not 0 <= trainable_layers <= 5:
        raise ConfigError(f"detection: trainable_layers must be in 0..5, got {trainable_layers}")
    order = [("conv1", "bn1"), *((s,) for s in STAGES)]
    for group in order[: 5 - trainable_layers]:
        for name in group:
            module = getattr(backbone, name)
            module.requires_grad_(False)
            frozen = freeze_batch_norm_2d(module)
            if frozen is not module:
                setattr(backbone, name, frozen)


def c2_xavier_fill(module: nn.Module) -> None:
    """detectron2's ``c2_xavier_fill`` for every Linear: kaiming uniform (a=1), bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.kaiming_uniform_(m.weight, a=1)
            nn.init.zeros_(m.bias)


def detectron2_predictor(in_channels: int, num_classes: int) -> FastRCNNPredictor:
    """``FastRCNNPredictor`` with detectron2's init: scores N(0, 0.01), deltas N(0, 0.001)."""
    predictor = FastRCNNPredictor(in_channels, num_classes + 1)
    nn.init.normal_(predictor.cls_score.weight, std=0.01)
    nn.init.normal_(predictor.bbox_pred.weight, std=0.001)
    nn.init.zeros_(predictor.cls_score.bias)
    nn.init.zeros_(predictor.bbox_pred.bias)
    return predictor


class Res5Head(nn.Module):
    """detectron2's ``Res5ROIHeads`` box head: res5 on the 14 x 14 RoI features (its first
    block strides to 7 x 7), PixPro's extra norm, then global average pooling."""

    def __init__(self, res5: nn.Module, channels: int, extra_norm: bool = True) -> None:
        super().__init__()
        self.res5 = res5
        self.norm = nn.BatchNorm2d(channels) if extra_norm else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.res5(x)).mean(dim=(2, 3))


def scaled_sizes(image_size: int, train_sizes: Sequence[int] | None,
                 max_size: int | None) -> tuple[tuple[int, ...], int]:
    scale = image_size / REFERENCE_TEST_SIZE
    if train_sizes is None:
        train_sizes = sorted({max(round(s * scale), 1) for s in VOC_TRAIN_SIZES})
    train_sizes = tuple(int(s) for s in train_sizes)
    if not train_sizes or min(train_sizes) < 1 or image_size < 1:
        raise ConfigError(f"detection: sizes must be positive, got image_size={image_size}, "
                          f"train_sizes={train_sizes}")
    if max_size is None:
        max_size = round(REFERENCE_MAX_SIZE * scale)
    return train_sizes, max(int(max_size), image_size, *train_sizes)


def build_detector(
    backbone: nn.Module,
    num_classes: int,
    *,
    arch: str = "fpn",
    norm: str = "syncbn",
    trainable_layers: int | None = None,
    image_size: int = REFERENCE_TEST_SIZE,
    train_sizes: Sequence[int] | None = None,
    max_size: int | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    fpn_channels: int = 256,
    box_fc_dim: int = 1024,
    rpn_batch_size: int = 256,
    roi_batch_size: int = 512,
) -> FasterRCNN:
    """Faster R-CNN (``arch`` "fpn" or "c4") over a timm ResNet, for ``num_classes`` object
    classes (labels 1..num_classes; 0 is background). See the module docstring."""
    if arch not in ARCHS:
        raise ConfigError(f"detection: unknown arch {arch!r}; allowed: {', '.join(ARCHS)}")
    if norm not in NORMS:
        raise ConfigError(f"detection: unknown norm {norm!r}; allowed: {', '.join(NORMS)}")
    if num_classes < 1:
        raise ConfigError(f"detection: num_classes must be >= 1, got {num_classes}")
    check_resnet(backbone)
    channels = stage_channels(backbone)
    if trainable_layers is None:
        trainable_layers = 5 if norm == "syncbn" else 3
    if norm == "frozen":
        for name, child in list(backbone.named_children()):
            frozen = freeze_batch_norm_2d(child)
            if frozen is not child:
                setattr(backbone, name, frozen)
    freeze_stages(backbone, trainable_layers)
    head_norm = nn.BatchNorm2d if norm == "syncbn" else None
    sizes, max_side = scaled_sizes(image_size, train_sizes, max_size)

    if arch == "fpn":
        body = BackboneWithFPN(backbone, {s: str(i) for i, s in enumerate(STAGES)},
                               [channels[s] for s in STAGES], fpn_channels,
                               extra_blocks=LastLevelMaxPool(), norm_layer=head_norm)
        anchors = AnchorGenerator(((32,), (64,), (128,), (256,), (512,)), ((0.5, 1.0, 2.0),) * 5)
        pooler = MultiScaleRoIAlign(["0", "1", "2", "3"], output_size=7, sampling_ratio=0)
        if norm == "syncbn":  # 4conv1fc, COCO_R_50_FPN_1x.yaml
            box_head = FastRCNNConvFCHead((fpn_channels, 7, 7), [fpn_channels] * 4, [box_fc_dim],
                                          norm_layer=head_norm)
        else:  # 2fc, Base-RCNN-FPN.yaml
            box_head = TwoMLPHead(fpn_channels * 7 * 7, box_fc_dim)
        c2_xavier_fill(box_head)
        predictor = detectron2_predictor(box_fc_dim, num_classes)
        rpn_in, rpn_topk = fpn_channels, dict(rpn_pre_nms_top_n_train=2000,
                                              rpn_post_nms_top_n_train=1000,
                                              rpn_pre_nms_top_n_test=1000,
                                              rpn_post_nms_top_n_test=1000)
    else:
        body = IntermediateLayerGetter(backbone, {"layer3": "0"})
        body.out_channels = channels["layer3"]
        anchors = AnchorGenerator(((32, 64, 128, 256, 512),), ((0.5, 1.0, 2.0),))
        pooler = MultiScaleRoIAlign(["0"], output_size=14, sampling_ratio=0)
        box_head = Res5Head(backbone.layer4, channels["layer4"], extra_norm=norm == "syncbn")
        predictor = detectron2_predictor(channels["layer4"], num_classes)
        rpn_in, rpn_topk = channels["layer3"], dict(rpn_pre_nms_top_n_train=12000,
                                                    rpn_post_nms_top_n_train=2000,
                                                    rpn_pre_nms_top_n_test=6000,
                                                    rpn_post_nms_top_n_test=1000)
    model = FasterRCNN(
        body,
        num_classes=None,
        min_size=sizes,
        max_size=max_side,
        image_mean=list(mean),
        image_std=list(std),
        rpn_anchor_generator=anchors,
        rpn_head=RPNHead(rpn_in, anchors.num_anchors_per_location()[0]),
        rpn_batch_size_per_image=rpn_batch_size,
        box_roi_pool=pooler,
        box_head=box_head,
        box_predictor=predictor,
        box_batch_size_per_image=roi_batch_size,
        **rpn_topk,
    )
    model.train_sizes = sizes
    model.test_size = int(image_size)
    return model


def set_mode(model: FasterRCNN, training: bool) -> FasterRCNN:
    """Train mode draws each batch's min side from the training sizes; eval uses the test
    size (torchvision would take the last training size)."""
    model.train(training)
    model.transform.min_size = model.train_sizes if training else (model.test_size,)
    return model


# ----------------------------------------------------------------------------- data


def image_tensor(image: Any) -> Tensor:
    """A PIL image or (C, H, W) tensor as float RGB in [0, 1]."""
    if isinstance(image, Tensor):
        t = image
    else:
        t = pil_to_tensor(image.convert("RGB") if hasattr(image, "convert") else image)
    if t.dtype == torch.uint8:
        t = t.float() / 255.0
    if t.ndim != 3 or t.shape[0] != 3:
        raise DataError(f"detection: expected an RGB image, got a tensor of shape "
                        f"{tuple(t.shape)}")
    return t.float()


def target_of(dataset: Dataset, index: int) -> dict:
    """The annotation of one sample without decoding its image where the reader allows."""
    if hasattr(dataset, "target"):
        return dataset.target(index)
    if isinstance(dataset, Subset):
        return target_of(dataset.dataset, dataset.indices[index])
    if isinstance(dataset, ConcatDataset):
        part = bisect.bisect_right(dataset.cumulative_sizes, index)
        start = dataset.cumulative_sizes[part - 1] if part else 0
        return target_of(dataset.datasets[part], index - start)
    sample = dict(dataset[index])
    sample.pop("image", None)
    return sample


def check_target(sample: Mapping[str, Any], num_classes: int, where: str) -> dict:
    boxes = torch.as_tensor(sample["boxes"], dtype=torch.float32).reshape(-1, 4)
    labels = torch.as_tensor(sample["labels"], dtype=torch.int64).reshape(-1)
    difficult = sample.get("difficult")
    difficult = (torch.zeros(len(labels), dtype=torch.bool) if difficult is None
                 else torch.as_tensor(difficult, dtype=torch.bool).reshape(-1))
    if not len(boxes) == len(labels) == len(difficult):
        raise DataError(f"{where}: {len(boxes)} boxes, {len(labels)} labels and "
                        f"{len(difficult)} difficult flags")
    if len(labels) and (labels.min() < 1 or labels.max() > num_classes):
        raise DataError(f"{where}: labels must be in 1..{num_classes} (0 is background), got "
                        f"{sorted(set(labels.tolist()))}")
    return {"boxes": boxes, "labels": labels, "difficult": difficult}


class DetectionView(Dataset):
    """Samples as (image tensor, target) for torchvision; a training key is
    ``(index, flip)``, the flip drawn by the sampler."""

    def __init__(self, dataset: Dataset, num_classes: int) -> None:
        self.dataset = dataset
        self.num_classes = num_classes

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int | tuple[int, bool]) -> tuple[Tensor, dict]:
        index, flip = key if isinstance(key, tuple) else (key, False)
        sample = self.dataset[index]
        image_id = str(sample.get("image_id", index))
        target = check_target(sample, self.num_classes, f"image {image_id!r}")
        target["image_id"] = image_id
        image = image_tensor(sample["image"])
        if flip:
            image = image.flip(-1)
            boxes = target["boxes"].clone()
            boxes[:, [0, 2]] = image.shape[-1] - target["boxes"][:, [2, 0]]
            target["boxes"] = boxes
        return image, target


class InfiniteFlipSampler(Sampler):
    """detectron2's ``TrainingSampler``: one shuffled permutation after another, endless,
    each index paired with a horizontal-flip draw (p = 0.5), all from one seeded generator;
    of ``world`` processes, ``rank`` takes every ``world``-th draw from its ``rank``-th
    (detectron2's ``islice(self._infinite_indices(), rank, None, world_size)``)."""

    def __init__(self, indices: Sequence[int], seed: int, hflip: bool = True, *,
                 rank: int = 0, world: int = 1) -> None:
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in [0, {world})")
        self.indices = list(indices)
        self.seed = seed
        self.hflip = hflip
        self.rank, self.world = rank, world

    def _draws(self) -> Iterator[tuple[int, bool]]:
        g = torch.Generator().manual_seed(self.seed)
        while True:
            for i in torch.randperm(len(self.indices), generator=g).tolist():
                flip = self.hflip and bool(torch.rand(1, generator=g).item() < 0.5)
                yield self.indices[i], flip

    def __iter__(self) -> Iterator[tuple[int, bool]]:
        return itertools.islice(self._draws(), self.rank, None, self.world)


def collate(batch: list) -> tuple[list[Tensor], list[dict]]:
    images, targets = zip(*batch, strict=True)
    return list(images), list(targets)


def to_device(images: list[Tensor], targets: list[dict], device: torch.device
              ) -> tuple[list[Tensor], list[dict]]:
    images = [i.to(device, non_blocking=True) for i in images]
    targets = [{"boxes": t["boxes"].to(device), "labels": t["labels"].to(device)}
               for t in targets]
    return images, targets


# ----------------------------------------------------------------------------- training


def detectron2_param_groups(model: nn.Module, weight_decay: float,
                            weight_decay_norm: float = 0.0) -> list[dict]:
    """detectron2 0.2 ``build_optimizer``: ``weight_decay_norm`` for the parameters of norm
    layers, ``weight_decay`` for all others (biases included); one lr for all."""
    decay, norm = [], []
    seen: set[int] = set()
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            (norm if isinstance(module, NORM_TYPES) else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": norm, "weight_decay": weight_decay_norm}]
    return [g for g in groups if g["params"]]


def warmup_multistep_lr(step: int, base_lr: float, milestones: Sequence[int], gamma: float = 0.1,
                        warmup_steps: int = 0, warmup_factor: float = 1e-3) -> float:
    """detectron2's ``WarmupMultiStepLR`` at iteration ``step`` (0-based): ``gamma`` per
    milestone passed, times ``warmup_factor * (1 - a) + a`` with ``a = step / warmup_steps``
    during the linear warmup."""
    lr = base_lr * gamma ** bisect.bisect_right(list(milestones), step)
    if step < warmup_steps:
        alpha = step / warmup_steps
        lr *= warmup_factor * (1 - alpha) + alpha
    return lr


@torch.no_grad()
def precise_bn_update(model: nn.Module, batches: Iterator, num_iters: int,
                      device: torch.device, fabric=None) -> int:
    """detectron2's ``PreciseBN`` hook: each BatchNorm in train mode gets running statistics
    equal to the mean of its batch statistics over ``num_iters`` training batches (PyTorch's
    cumulative average, ``momentum=None``); with a distributed ``fabric`` every rank runs its
    own batches and the ranks' statistics are averaged (as detectron2; the mean of the ranks'
    variances leaves out the spread of their means).
    Returns how many BN layers were updated."""
    bns = [m for m in model.modules()
           if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    if not bns or num_iters <= 0:
        return 0
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    try:
        for _ in range(num_iters):
            images, targets = to_device(*next(batches), device)
            model(images, targets)
    finally:
        for bn, momentum in zip(bns, momenta, strict=True):
            bn.momentum = momentum
    if fabric is not None and fabric.world_size > 1:
        for bn in bns:
            bn.running_mean.copy_(fabric.all_reduce(bn.running_mean, reduce_op="mean"))
            bn.running_var.copy_(fabric.all_reduce(bn.running_var, reduce_op="mean"))
    return len(bns)


# ----------------------------------------------------------------------------- metrics


def _tensor(value: Any, dtype: torch.dtype, shape_tail: tuple[int, ...] = ()) -> Tensor:
    return torch.as_tensor(value, dtype=dtype).reshape(-1, *shape_tail)


def _percent(value: Tensor) -> float:
    value = float(value)
    return float("nan") if value < 0 else value * 100.0


def detection_metrics(predictions: Sequence[Mapping[str, Any]],
                      targets: Sequence[Mapping[str, Any]]) -> dict:
    """COCO-style box AP (percent) of per-image ``predictions`` (boxes xyxy, scores, labels)
    against ``targets`` (boxes, labels, optional difficult), paired by position:
    ``{"ap": AP@[.50:.95], "ap50": AP@.50, "ap75": AP@.75, "per_class_ap": {label: AP}}``.
    Difficult objects are COCO crowd regions (neither matched nor missed). A value with no
    ground truth to score is NaN. Lists or tensors both work (the returned ``predictions``
    of ``run_detection`` go straight back in, e.g. for a bootstrap over images)."""
    if len(predictions) != len(targets):
        raise ConfigError(f"detection_metrics: {len(predictions)} predictions for "
                          f"{len(targets)} images")
    metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", class_metrics=True,
                                  backend="pycocotools")
    preds, gts = [], []
    for pred, target in zip(predictions, targets, strict=True):
        if "image_id" in pred and "image_id" in target and pred["image_id"] != target["image_id"]:
            raise ConfigError(f"detection_metrics: prediction for {pred['image_id']!r} paired "
                              f"with the target of {target['image_id']!r}")
        preds.append({"boxes": _tensor(pred["boxes"], torch.float32, (4,)),
                      "scores": _tensor(pred["scores"], torch.float32),
                      "labels": _tensor(pred["labels"], torch.int64)})
        labels = _tensor(target["labels"], torch.int64)
        difficult = target.get("difficult")
        crowd = (torch.zeros_like(labels) if difficult is None
                 else _tensor(difficult, torch.int64))
        gts.append({"boxes": _tensor(target["boxes"], torch.float32, (4,)), "labels": labels,
                    "iscrowd": crowd})
    metric.update(preds, gts)
    result = metric.compute()
    classes = result["classes"].reshape(-1).tolist()
    per_class = result["map_per_class"].reshape(-1).tolist()
    return {
        "ap": _percent(result["map"]),
        "ap50": _percent(result["map_50"]),
        "ap75": _percent(result["map_75"]),
        "per_class_ap": {int(c): _percent(torch.tensor(v))
                         for c, v in zip(classes, per_class, strict=True)},
    }


def _coco_evaluated(predictions: Sequence[Mapping[str, Any]],
                    targets: Sequence[Mapping[str, Any]]):
    """pycocotools' ``COCOeval`` (bbox, area range "all", 100 detections an image) after its
    per-image matching (``evaluate``), images numbered by position. Built as torchmetrics'
    pycocotools backend builds it (float32 boxes converted to xywh by torchvision's
    ``box_convert``, ``iscrowd`` = difficult, its IoU and recall thresholds), so its AP is
    ``detection_metrics``'."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    from torchvision.ops import box_convert

    def xywh(boxes: Any) -> list[list[float]]:
        return box_convert(_tensor(boxes, torch.float32, (4,)), "xyxy", "xywh").tolist()

    images, gts, dts = [], [], []
    for index, (pred, target) in enumerate(zip(predictions, targets, strict=True)):
        images.append({"id": index})
        labels = _tensor(target["labels"], torch.int64).tolist()
        difficult = target.get("difficult")
        crowd = [0] * len(labels) if difficult is None else _tensor(
            difficult, torch.int64).tolist()
        for box, label, is_crowd in zip(xywh(target["boxes"]), labels, crowd, strict=True):
            gts.append({"id": len(gts) + 1, "image_id": index, "category_id": label,
                        "bbox": box, "area": box[2] * box[3], "iscrowd": int(is_crowd)})
        scores = _tensor(pred["scores"], torch.float32).tolist()
        for box, score, label in zip(xywh(pred["boxes"]), scores,
                                     _tensor(pred["labels"], torch.int64).tolist(), strict=True):
            dts.append({"id": len(dts) + 1, "image_id": index, "category_id": label,
                        "bbox": box, "area": box[2] * box[3], "score": score, "iscrowd": 0})
    categories = [{"id": c} for c in sorted({a["category_id"] for a in gts + dts})]
    coco_gt, coco_dt = COCO(), COCO()
    with contextlib.redirect_stdout(io.StringIO()):
        for coco, anns in ((coco_gt, gts), (coco_dt, dts)):
            coco.dataset = {"images": images, "annotations": anns, "categories": categories}
            coco.createIndex()
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
        evaluator.params.areaRng = [[0.0, 1e10]]
        evaluator.params.areaRngLbl = ["all"]
        evaluator.params.maxDets = [100]
        # torchmetrics' thresholds: float32 linspaces (0.55 is 0.550000011920929, ...)
        evaluator.params.iouThrs = np.array(torch.linspace(0.5, 0.95, 10).tolist())
        evaluator.params.recThrs = np.array(torch.linspace(0.0, 1.0, 101).tolist())
        evaluator.evaluate()
    return evaluator


def _ap_triple(evaluator) -> tuple[float, float, float]:
    """AP@[.50:.95], AP@.50, AP@.75 (percent) of an accumulated ``COCOeval``, as its
    ``summarize`` reads them (the mean over the defined precisions)."""
    precision = evaluator.eval["precision"][:, :, :, 0, 0]  # (T, R, K)
    iou = list(np.round(evaluator.params.iouThrs, 2))

    def mean(values: np.ndarray) -> float:
        defined = values[values > -1]
        return float(defined.mean()) * 100.0 if defined.size else math.nan

    return mean(precision), mean(precision[iou.index(0.5)]), mean(precision[iou.index(0.75)])


def detection_ci(predictions: Sequence[Mapping[str, Any]],
                 targets: Sequence[Mapping[str, Any]], n_resamples: int = 1000,
                 seed: int = 0, level: float = 0.95) -> dict:
    """95% bootstrap intervals over test images of AP, AP50 and AP75:
    ``{"ap": [low, high], "ap50": ..., "ap75": ...}``.

    COCO's matching of detections to boxes is per image, so pycocotools' ``evaluate`` runs
    once; each resample (``n_resamples`` draws of N images with replacement from
    ``numpy.random.default_rng(seed)``, as ``results.bootstrap``) re-runs only its
    ``accumulate`` over the drawn images' per-image records, a drawn image counted as often
    as it is drawn. Percentile intervals (``results.bootstrap.percentile_interval``)."""
    from visionbench.results.bootstrap import percentile_interval

    if n_resamples < 1:
        raise ConfigError(f"detection: bootstrap resamples must be >= 1, got {n_resamples}")
    evaluator = _coco_evaluated(predictions, targets)
    n, per_image = len(targets), list(evaluator.evalImgs)
    categories = len(evaluator.params.catIds)
    rng = np.random.default_rng(seed)
    stats = np.empty((n_resamples, 3))
    for b in range(n_resamples):
        drawn = rng.integers(0, n, size=n)
        evaluator.evalImgs = [per_image[k * n + i] for k in range(categories) for i in drawn]
        with contextlib.redirect_stdout(io.StringIO()):
            evaluator.accumulate()
        stats[b] = _ap_triple(evaluator)
    return {key: list(percentile_interval(stats[:, j], level))
            for j, key in enumerate(("ap", "ap50", "ap75"))}


@torch.no_grad()
def predict(model: FasterRCNN, dataset: Dataset, num_classes: int, *, batch_size: int = 1,
            device: torch.device | str = "cpu", num_workers: int = 0
            ) -> tuple[list[dict], list[dict]]:
    """Per-image detections (boxes in the original image's pixels, rounded to 0.01 px;
    scores to 1e-5) and the matching targets, as plain lists."""
    device = torch.device(device)
    set_mode(model, False)
    loader = DataLoader(DetectionView(dataset, num_classes), batch_size=batch_size,
                        shuffle=False, num_workers=num_workers, collate_fn=collate)
    predictions, targets = [], []
    for images, batch_targets in loader:
        outputs = model([i.to(device) for i in images])
        for out, target in zip(outputs, batch_targets, strict=True):
            predictions.append({
                "image_id": target["image_id"],
                "boxes": np.round(out["boxes"].cpu().numpy().astype(np.float64), 2).tolist(),
                "scores": np.round(out["scores"].cpu().numpy().astype(np.float64), 5).tolist(),
                "labels": out["labels"].cpu().tolist(),
            })
            targets.append({
                "image_id": target["image_id"],
                "boxes": target["boxes"].tolist(),
                "labels": target["labels"].tolist(),
                "difficult": target["difficult"].tolist(),
            })
    return predictions, targets


# ----------------------------------------------------------------------------- protocol


def run_detection(
    backbone: nn.Module,
    train_set: Dataset,
    test_set: Dataset,
    num_classes: int,
    *,
    arch: str = "fpn",
    norm: str = "syncbn",
    image_size: int = REFERENCE_TEST_SIZE,
    train_sizes: Sequence[int] | None = None,
    max_size: int | None = None,
    epochs: float | None = None,
    max_steps: int | None = None,
    batch_size: int = REFERENCE_BATCH,
    lr: float | None = None,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    weight_decay_norm: float = 0.0,
    lr_decay_at: Sequence[float] = DETECTION_DEFAULTS["lr_decay_at"],
    gamma: float = 0.1,
    warmup_steps: int | None = None,
    warmup_factor: float = 1e-3,
    trainable_layers: int | None = None,
    precise_bn_iters: int = 200,
    hflip: bool = True,
    fpn_channels: int = 256,
    box_fc_dim: int = 1024,
    rpn_batch_size: int = 256,
    roi_batch_size: int = 512,
    eval_batch_size: int = 1,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    class_names: Sequence[str] | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    log_every: int = 20,
    fabric=None,
) -> dict | None:
    """Fine-tune Faster R-CNN on ``train_set`` and score it on ``test_set``.

    ``fabric`` (a launched ``lightning.Fabric``; then ``device`` is its own) trains on its
    processes as detectron2's ``launch`` does: ``batch_size`` is the batch of all of them
    (``IMS_PER_BATCH``), each takes its share of the one seeded sample stream, DDP averages
    the gradients, BatchNorm is SyncBatchNorm on CUDA (``norm="syncbn"``), the logged losses
    are the ranks' mean, and its precision plugin runs the forward (mixed precision on a
    GPU). Rank 0 then tests alone and returns the result; the other ranks return None.

    Data sets yield dicts ``{"image", "boxes" (K, 4) xyxy pixels, "labels" (K,) in
    1..num_classes, "difficult" (K,) optional, "image_id"}`` (``VOCDetection``). Give
    ``max_steps`` (iterations) or ``epochs`` (passes over the training images that hold a
    box). ``image_size`` is the test min side; ``train_sizes`` the training min sides
    (default: VOC's 480..800 rescaled by ``image_size / 800``). ``lr`` defaults to
    0.02 x batch / 16; ``warmup_steps`` to 100 / 24000 of the schedule; ``lr_decay_at`` are
    fractions of it. Returns::

        {"protocol": "detection", "metrics": {"ap", "ap50", "ap75"} (percent),
         "per_class_ap": {class: AP}, "predictions": [{"image_id", "boxes", "scores",
         "labels"}], "targets": [...], "history": [{"step", "lr", "loss", ...}],
         "config": {...}, "train_seconds": float}

    ``detection_metrics(result["predictions"], result["targets"])`` gives the metrics again.
    """
    if (epochs is None) == (max_steps is None):
        raise ConfigError("detection: give exactly one of epochs and max_steps")
    if batch_size < 1 or eval_batch_size < 1:
        raise ConfigError("detection: batch sizes must be >= 1")
    world = fabric.world_size if fabric is not None else 1
    rank = fabric.global_rank if fabric is not None else 0
    if batch_size % world:
        raise ConfigError(f"detection: the batch {batch_size} (of all devices) is not "
                          f"divisible by the {world} devices")
    device = fabric.device if fabric is not None else torch.device(device)
    torch.manual_seed(seed)
    model = build_detector(
        backbone, num_classes, arch=arch, norm=norm, trainable_layers=trainable_layers,
        image_size=image_size, train_sizes=train_sizes, max_size=max_size, mean=mean, std=std,
        fpn_channels=fpn_channels, box_fc_dim=box_fc_dim, rpn_batch_size=rpn_batch_size,
        roi_batch_size=roi_batch_size,
    )
    if world > 1 and norm == "syncbn" and device.type == "cuda":
        model = convert_sync_batchnorm(model)  # torch's SyncBatchNorm runs on CUDA only
    model = model.to(device)

    # detectron2's FILTER_EMPTY_ANNOTATIONS: training images need at least one box.
    keep = [i for i in range(len(train_set)) if len(target_of(train_set, i)["labels"]) > 0]
    if not keep:
        raise DataError("detection: no training image holds a box")
    if len(test_set) == 0:
        raise DataError("detection: the test set is empty")
    if max_steps is None:
        max_steps = math.ceil(epochs * len(keep) / batch_size)
    if max_steps < 1:
        raise ConfigError(f"detection: the schedule has {max_steps} steps; need at least 1")
    if lr is None:
        lr = REFERENCE_LR * batch_size / REFERENCE_BATCH
    if warmup_steps is None:
        warmup_steps = round(max_steps * REFERENCE_WARMUP / REFERENCE_STEPS)
    milestones = sorted(round(f * max_steps) for f in lr_decay_at)

    sampler = InfiniteFlipSampler(keep, seed, hflip, rank=rank, world=world)
    loader = DataLoader(DetectionView(train_set, num_classes), batch_size=batch_size // world,
                        sampler=sampler, num_workers=num_workers, collate_fn=collate)
    batches = iter(loader)
    optimizer = torch.optim.SGD(detectron2_param_groups(model, weight_decay, weight_decay_norm),
                                lr=lr, momentum=momentum)
    trained = model  # the detector itself; ``model`` the one trained (DDP-wrapped on ranks)
    if fabric is not None:
        model, optimizer = fabric.setup(model, optimizer)

    history: list[dict] = []
    window: dict[str, float] = {}
    window_steps = 0
    set_mode(trained, True)
    model.train(True)
    start = time.perf_counter()
    for step in range(max_steps):
        step_lr = warmup_multistep_lr(step, lr, milestones, gamma, warmup_steps, warmup_factor)
        for group in optimizer.param_groups:
            group["lr"] = step_lr
        images, targets = to_device(*next(batches), device)
        losses = model(images, targets)
        loss = sum(losses.values())
        # the ranks' mean, so every rank takes the same decision on a non-finite loss
        logged = torch.stack([loss.detach(), *(v.detach() for v in losses.values())]).float()
        if fabric is not None and world > 1:
            logged = fabric.all_reduce(logged, reduce_op="mean")
        logged = logged.tolist()
        if not math.isfinite(logged[0]):
            parts = ", ".join(f"{k}={v:.4g}" for k, v in zip(losses, logged[1:], strict=True))
            raise FloatingPointError(f"detection: loss became {logged[0]} at step {step} "
                                     f"({parts}); lower the lr")
        optimizer.zero_grad(set_to_none=True)
        if fabric is not None:
            fabric.backward(loss)
        else:
            loss.backward()
        optimizer.step()
        window["loss"] = window.get("loss", 0.0) + logged[0]
        for key, value in zip(losses, logged[1:], strict=True):
            window[key] = window.get(key, 0.0) + value
        window_steps += 1
        if window_steps == log_every or step == max_steps - 1:
            history.append({"step": step + 1, "lr": step_lr,
                            **{k: v / window_steps for k, v in window.items()}})
            window, window_steps = {}, 0
    precise = precise_bn_update(trained, batches, precise_bn_iters, device, fabric)
    train_seconds = time.perf_counter() - start
    del batches
    if rank != 0:
        return None
    model = trained

    with rank_local():  # the test runs on rank 0 alone
        predictions, targets = predict(model, test_set, num_classes,
                                       batch_size=eval_batch_size, device=device,
                                       num_workers=num_workers)
        scores = detection_metrics(predictions, targets)
    names = list(class_names) if class_names is not None else None
    per_class = {(names[c - 1] if names and 0 < c <= len(names) else str(c)): v
                 for c, v in sorted(scores["per_class_ap"].items())}
    return {
        "protocol": "detection",
        "metrics": {"ap": scores["ap"], "ap50": scores["ap50"], "ap75": scores["ap75"]},
        "per_class_ap": per_class,
        "predictions": predictions,
        "targets": targets,
        "history": history,
        "train_seconds": train_seconds,
        "config": {
            "arch": arch, "norm": norm, "num_classes": num_classes,
            "image_size": image_size, "train_sizes": list(model.train_sizes),
            "max_size": model.transform.max_size, "max_steps": max_steps,
            "batch_size": batch_size, "devices": world, "lr": lr, "momentum": momentum,
            "weight_decay": weight_decay, "weight_decay_norm": weight_decay_norm,
            "lr_milestones": milestones, "gamma": gamma, "warmup_steps": warmup_steps,
            "warmup_factor": warmup_factor,
            "trainable_layers": 5 if trainable_layers is None and norm == "syncbn"
            else 3 if trainable_layers is None else trainable_layers,
            "precise_bn_iters": precise_bn_iters if precise else 0, "hflip": hflip,
            "fpn_channels": fpn_channels, "box_fc_dim": box_fc_dim,
            "rpn_batch_size": rpn_batch_size, "roi_batch_size": roi_batch_size,
            "mean": list(mean), "std": list(std), "seed": seed,
            "train_images": len(keep), "test_images": len(test_set),
            "metric_backend": "torchmetrics MeanAveragePrecision (pycocotools)",
        },
    }
