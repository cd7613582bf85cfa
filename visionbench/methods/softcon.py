"""SoftCon: "Multi-Label Guided Soft Contrastive Learning for Efficient Earth Observation
Pretraining" (Wang, Albrecht, Zhu, IEEE TGRS 2024, arXiv 2405.20462).

There is no official training code: zhu-xlab/softcon releases the backbones and their model
code only. The paper's method section could not be read from this project's sources (only
its abstract), so its equation numbers cannot be given. What is built here is the method as
the abstract and the project's issue state it, on the contrastive framework of the same
group's SSL4EO-S12 (zhu-xlab/SSL4EO-S12, ``src/benchmark/pretrain_ssl/``):

- **Framework** (``models/moco_v3/builder.py``, ``pretrain_moco_v3_s2c.py``): a student
  (backbone -> projector -> predictor) and an EMA teacher (backbone -> projector, no
  gradient), MoCo v3's MLPs (``_build_mlp``: Linear without bias, BN, ReLU; the last BN
  without affine; projector 3 layers for ViTs and 2 for ResNets, predictor 2 layers, 4096
  hidden, 256 out). Teacher momentum ``1 - (1 - m) (cos(pi k / K) + 1) / 2`` (``--moco-m
  0.99 --moco-m-cos``), updated once per optimizer step before the targets are computed.
- **Loss.** For student queries ``q_i`` (view a) and teacher keys ``k_j`` (view b),
  L2-normalized, the logits are ``z_ij = q_i . k_j / tau`` over the global batch of keys.
  With ``p_ij = softmax_j(z_ij)``:

  - hard term (MoCo v3's ``contrastive_loss``, identity targets):
    ``L_hard = -(1/B) sum_i log p_ii``;
  - soft term, targets from the land-cover multi-label vectors ``y``:
    ``S_ij = sim(y_i, y_j)`` (cosine, or Jaccard), ``t_ij = S_ij / sum_j S_ij``,
    ``L_soft = -(1/B) sum_i sum_j t_ij log p_ij``. A scene with no label has the identity
    row ``S_ij = [i = j]``, so ``L_soft = L_hard`` when ``S`` is the identity;
  - per direction ``2 tau (L_hard + lambda L_soft)`` (``lambda``: ``soft_weight``; MoCo v3's
    ``2 tau`` factor), summed over both directions (a -> b and b -> a).

- **Siamese masking**: the student encodes its views with a random ``mask_ratio`` of the
  ViT's patch tokens dropped (MAE's per-sample ``random_masking``), the teacher encodes the
  whole views (``mask_teacher`` masks them too). ResNets are not masked.
- **Continual pretraining with channel adaptation**: ``init_weights`` (a local RGB
  checkpoint: DINOv2's for the ViTs, DINO's for ResNet-50) is loaded into the multispectral
  backbone. Its stem, whose input channels differ, is by default left at the model's random
  init while every other layer is loaded (``stem_init: random``; a third-party summary of
  the paper, the only account of its method section found here, reports this "simple
  weight-initialization" and its advantage over weight inflation). ``stem_init: adapt``
  inflates it instead: the 3-channel kernel goes to B04 / B03 / B02 (a 2-band SAR input has
  none), every other band starts from the mean of the three, and the kernel is scaled by
  ``3 / in_chans`` (``visionbench.backbones.weights.adapt_rgb_stem``).
- **Data** (``pretrain_moco_v3_s2c.py`` with ``rs_transforms_float32.py``): two views, each
  RandomResizedCrop (scale ``crop_scale``), band-uniform brightness and contrast 0.4 with
  p 0.8 (``RandomBrightness``, ``RandomContrast``), grayscale (the band mean in every band)
  p 0.2, Gaussian blur sigma ~ U(0.1, 2) with p 1.0 / 0.1, horizontal flip; then the bands
  standardized with the data section's mean / std.

Deviations from SSL4EO-S12's MoCo v3 script (the paper's own choices being unknown): AdamW
with MAE's ``blr x batch / 256`` and per-step warmup + cosine (the script: LARS lr 0.6,
wd 1e-6, no batch scaling, for ResNets); ``tau`` 0.2 (MoCo v3's ViT value; the script's
default 1.0); the ViT's token dropping (the script does not mask); the blur's kernel is
``2 ceil(3 sigma) + 1`` pixels (torchvision; the script's cv2 picks its own size). As the
script's defaults, the patch embedding trains (``--stop-grad-conv1`` off) and every
BatchNorm is synchronized across ranks (``sync_batchnorm``: SyncBatchNorm under DDP).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from timm.models.resnet import ResNet
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as TF

from visionbench.data.multispectral.bands import RGB_BANDS, S2_BANDS
from visionbench.data.multispectral.landcover import map_labels
from visionbench.errors import ConfigError
from visionbench.methods.base import PretrainModule
from visionbench.methods.mae import random_masking
from visionbench.methods.registry import register_method
from visionbench.methods.schedule import momentum_at
from visionbench.schema import CropScale, LocalFile, MethodConfig


class SoftConConfig(MethodConfig):
    """SoftCon's section; defaults follow SSL4EO-S12's ``pretrain_moco_v3_s2c.py`` (100
    epochs, 10 warmup, momentum 0.99 with the cosine schedule, 256 / 4096 MLPs) with MoCo v3's
    ViT optimizer (AdamW, blr 1.5e-4, wd 0.1) and temperature 0.2."""

    method: Literal["softcon"] = "softcon"
    epochs: int = Field(100, gt=0)
    warmup_epochs: float = Field(10, ge=0)
    blr: float = Field(1.5e-4, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    temperature: float = Field(0.2, gt=0)
    momentum_base: float = Field(0.99, ge=0, le=1)
    proj_hidden_dim: int = Field(4096, gt=0)
    proj_dim: int = Field(256, gt=0)
    soft_weight: float = Field(1.0, ge=0)  # lambda; 0 is MoCo v3's hard loss alone
    label_similarity: Literal["cosine", "jaccard"] = "cosine"
    mask_ratio: float = Field(0.5, ge=0, lt=1)  # Siamese masking of the student's ViT tokens
    mask_teacher: bool = False
    init_weights: LocalFile = None  # a local RGB (or same-band) checkpoint to continue from
    # its stem when the input channels differ: the model's random init, or the RGB kernel
    # mapped onto the bands (weight inflation)
    stem_init: Literal["random", "adapt"] = "random"
    crop_scale: CropScale = (0.08, 1.0)  # --crop-min 0.08


# -- loss ------------------------------------------------------------------------------------


def label_similarity(a: torch.Tensor, b: torch.Tensor, kind: str = "cosine") -> torch.Tensor:
    """``S`` ``(len(a), len(b))`` between multi-label vectors (rows of ``a`` / ``b``, 0/1 or
    fractions): cosine, or Jaccard ``sum min / sum max``; 0 where either vector is empty."""
    a = a.to(torch.promote_types(a.dtype, torch.float32))
    b = b.to(a.dtype)
    if kind == "cosine":
        return F.normalize(a, dim=1) @ F.normalize(b, dim=1).T
    if kind == "jaccard":
        low = torch.minimum(a[:, None, :], b[None, :, :]).sum(-1)
        high = torch.maximum(a[:, None, :], b[None, :, :]).sum(-1)
        return torch.where(high > 0, low / high.clamp(min=1e-12), torch.zeros_like(high))
    raise ConfigError(f"pretrain.label_similarity: {kind!r} (expected cosine or jaccard)")


def soft_targets(similarity: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """Row-normalized targets ``t_ij = S_ij / sum_j S_ij``; a row with no similarity to any
    key (an empty label vector) falls back to its own key, column ``offset + i``."""
    n = similarity.shape[0]
    eye = torch.zeros_like(similarity)
    eye[torch.arange(n), offset + torch.arange(n)] = 1.0
    s = similarity.clamp(min=0)
    total = s.sum(dim=1, keepdim=True)
    return torch.where(total > 0, s / total.clamp(min=1e-12), eye)


def soft_contrastive_loss(q: torch.Tensor, k: torch.Tensor, targets: torch.Tensor | None,
                          temperature: float, soft_weight: float = 1.0,
                          offset: int = 0) -> torch.Tensor:
    """One direction: ``2 tau (L_hard + lambda L_soft)`` of queries ``q`` ``(B, D)`` against
    keys ``k`` ``(M, D)`` (this rank's are rows ``offset .. offset + B``); ``targets``
    ``(B, M)`` the soft targets (None: the hard term only)."""
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    logits = q @ k.T / temperature
    own = offset + torch.arange(q.shape[0], device=q.device)
    loss = F.cross_entropy(logits, own)
    if targets is not None and soft_weight > 0:
        loss = loss + soft_weight * F.cross_entropy(logits, targets.to(logits.dtype))
    return loss * (2 * temperature)


# -- data ------------------------------------------------------------------------------------


class SoftConView:
    """One view of a band tensor (raw digital numbers): crop, the photometric ops of
    ``rs_transforms_float32.py`` with blur probability ``blur_p``, flip, standardize."""

    def __init__(self, size: int, scale: Sequence[float], blur_p: float,
                 mean: Sequence[float], std: Sequence[float]) -> None:
        self.crop = v2.RandomResizedCrop(size, scale=tuple(scale), antialias=True,
                                         interpolation=InterpolationMode.BILINEAR)
        self.blur_p = blur_p
        self.mean = torch.tensor([float(v) for v in mean]).view(-1, 1, 1)
        self.std = torch.tensor([float(v) for v in std]).view(-1, 1, 1)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if image.shape[0] != self.mean.shape[0]:
            raise ConfigError(f"data.mean / data.std: {self.mean.shape[0]} values for "
                              f"{image.shape[0]}-band images")
        x = self.crop(image.float())
        if torch.rand(()) < 0.8:  # RandomApply([RandomBrightness(0.4), RandomContrast(0.4)])
            x = x * torch.empty(()).uniform_(0.6, 1.4)
            mean = x.mean(dim=(1, 2), keepdim=True)
            x = (x - mean) * torch.empty(()).uniform_(0.6, 1.4) + mean
        if torch.rand(()) < 0.2:  # ToGray: the band mean in every band
            x = x.mean(dim=0, keepdim=True).expand_as(x).clone()
        if torch.rand(()) < self.blur_p:
            sigma = float(torch.empty(()).uniform_(0.1, 2.0))
            kernel = min(2 * math.ceil(3 * sigma) + 1, 2 * ((min(x.shape[-2:]) - 1) // 2) + 1)
            x = TF.gaussian_blur(x, [kernel, kernel], [sigma, sigma])
        if torch.rand(()) < 0.5:
            x = x.flip(-1)
        return (x - self.mean) / self.std


class SoftConTransform:
    """Two asymmetric views of a sample's ``image`` and its multi-label vector mapped to the
    pretraining label space (``label_matrix``, None: as read): ``{view1, view2, label}``."""

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float],
                 crop_scale: Sequence[float] = (0.08, 1.0),
                 label_matrix: torch.Tensor | None = None) -> None:
        self.view1 = SoftConView(size, crop_scale, 1.0, mean, std)
        self.view2 = SoftConView(size, crop_scale, 0.1, mean, std)
        self.label_matrix = label_matrix

    def __call__(self, sample: dict) -> dict:
        label = sample["label"]
        if label.ndim != 1:
            raise ConfigError("SoftCon pretrains on multi-label samples (a label vector per "
                              "scene); this data set gives one class per sample")
        return {"view1": self.view1(sample["image"]), "view2": self.view2(sample["image"]),
                "label": map_labels(label, self.label_matrix)}


# -- model -----------------------------------------------------------------------------------


def build_mlp(num_layers: int, input_dim: int, mlp_dim: int, output_dim: int,
              last_bn: bool = True) -> nn.Sequential:
    """MoCo v3's ``_build_mlp``: Linear (no bias), BN, ReLU between; a BN without affine
    after the last Linear when ``last_bn``."""
    layers: list[nn.Module] = []
    for i in range(num_layers):
        dim1 = input_dim if i == 0 else mlp_dim
        dim2 = output_dim if i == num_layers - 1 else mlp_dim
        layers.append(nn.Linear(dim1, dim2, bias=False))
        if i < num_layers - 1:
            layers += [nn.BatchNorm1d(dim2), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(dim2, affine=False))
    return nn.Sequential(*layers)


def pooled(encoder: nn.Module, images: torch.Tensor, mask_ratio: float = 0.0,
           noise: torch.Tensor | None = None) -> torch.Tensor:
    """The backbone's pooled feature (timm's ``forward_head(pre_logits=True)``); a ViT with
    ``mask_ratio > 0`` drops that share of its patch tokens (``noise``: MAE's argsort noise)
    after the position embedding, before the blocks."""
    if mask_ratio <= 0 or not isinstance(encoder, VisionTransformer):
        return encoder.forward_head(encoder.forward_features(images), pre_logits=True)
    x = encoder._pos_embed(encoder.patch_embed(images))
    prefix = encoder.num_prefix_tokens
    kept, _, _ = random_masking(x[:, prefix:], mask_ratio, noise)
    x = torch.cat([x[:, :prefix], kept], dim=1)
    x = encoder.norm(encoder.blocks(encoder.norm_pre(encoder.patch_drop(x))))
    return encoder.forward_head(x, pre_logits=True)


def _frozen_copy(module: nn.Module) -> nn.Module:
    twin = copy.deepcopy(module)
    for param in twin.parameters():
        param.requires_grad = False
    return twin


@register_method
class SoftCon(PretrainModule):
    """SoftCon around a headless timm ViT or ResNet (``module.encoder``, the backbone
    evaluated); batches are ``{view1, view2, label}``."""

    config = SoftConConfig
    families = ("vit", "resnet")
    sync_batchnorm = True  # the runner passes Trainer(sync_batchnorm=True) under DDP

    def __init__(self, encoder: nn.Module, section: SoftConConfig | None = None, *,
                 batch_size: int = 64, backbone: str | None = None) -> None:
        section = SoftConConfig() if section is None else section
        is_vit = isinstance(encoder, VisionTransformer)
        if not is_vit and not isinstance(encoder, ResNet):
            raise ConfigError(f"model.backbone: softcon pretrains the families "
                              f"{', '.join(self.families)}, not "
                              f"{backbone or type(encoder).__name__}")
        super().__init__(section, batch_size=batch_size, betas=(0.9, 0.999))
        self.section = section
        self.mask_ratio = section.mask_ratio if is_vit else 0.0
        if is_vit and int(encoder.patch_embed.num_patches * (1 - self.mask_ratio)) < 1:
            raise ConfigError(f"pretrain.mask_ratio {section.mask_ratio} keeps no patch token "
                              f"of the {encoder.patch_embed.num_patches}")
        dim, hidden, out = int(encoder.num_features), section.proj_hidden_dim, section.proj_dim
        self.encoder = encoder
        self.projector = build_mlp(3 if is_vit else 2, dim, hidden, out)
        self.predictor = build_mlp(2, out, hidden, out, last_bn=is_vit)
        self.encoder_k = _frozen_copy(encoder)
        self.projector_k = _frozen_copy(self.projector)
        self._momentum_step_done = -1

    @classmethod
    def from_config(cls, encoder, section, model, data) -> SoftCon:
        if section.init_weights:
            from visionbench.backbones.weights import load_backbone_weights

            # adapt: 13 bands take R, G, B at B04 / B03 / B02; other inputs (SAR) the mean
            rgb = [S2_BANDS.index(b) for b in RGB_BANDS] if data.in_chans == 13 else []
            report = load_backbone_weights(encoder, section.init_weights,
                                           stem=section.stem_init, rgb_index=rgb)
        module = cls(encoder, section, batch_size=data.batch_size,
                     backbone=getattr(model, "backbone", None))
        if section.init_weights:
            module.init_report = f"continual pretraining from {report.summary()}"
        return module

    @classmethod
    def train_transform(cls, section, data, label_matrix=None) -> SoftConTransform:
        return SoftConTransform(data.image_size, data.mean, data.std, section.crop_scale,
                                label_matrix)

    # -- teacher -------------------------------------------------------------------------------
    def total_steps(self) -> int:
        return self.steps_per_epoch() * self.epochs

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        for online, key in ((self.encoder, self.encoder_k), (self.projector, self.projector_k)):
            for p_q, p_k in zip(online.parameters(), key.parameters(), strict=True):
                p_k.mul_(momentum).add_(p_q.detach(), alpha=1.0 - momentum)

    def momentum_step(self) -> float | None:
        """The once-per-optimizer-step EMA update (None: this step's ran already)."""
        if self._trainer is None:
            m = self.section.momentum_base
        else:
            if self.global_step == self._momentum_step_done:
                return None
            self._momentum_step_done = self.global_step
            m = momentum_at(self.global_step, self.total_steps(), self.section.momentum_base)
        self.update_teacher(m)
        return m

    # -- loss ----------------------------------------------------------------------------------
    def _gather(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Keys (or labels) of every rank, and where this rank's start (MoCo v3's
        ``concat_all_gather``); this rank's alone outside distributed training."""
        if self._trainer is None or self.trainer.world_size == 1:
            return x, 0
        gathered = self.all_gather(x.detach())
        return gathered.flatten(0, 1), self.global_rank * x.shape[0]

    def forward(self, view1: torch.Tensor, view2: torch.Tensor, labels: torch.Tensor | None,
                noise: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)
                ) -> torch.Tensor:
        """The loss (no momentum update); ``noise``: the students' masking noise per view."""
        s = self.section
        q1 = self.predictor(self.projector(pooled(self.encoder, view1, self.mask_ratio,
                                                  noise[0])))
        q2 = self.predictor(self.projector(pooled(self.encoder, view2, self.mask_ratio,
                                                  noise[1])))
        t_ratio = self.mask_ratio if s.mask_teacher else 0.0
        with torch.no_grad():
            k1 = self.projector_k(pooled(self.encoder_k, view1, t_ratio, noise[0]))
            k2 = self.projector_k(pooled(self.encoder_k, view2, t_ratio, noise[1]))
        k1, offset = self._gather(k1)
        k2, _ = self._gather(k2)
        targets = None
        if labels is not None and s.soft_weight > 0:
            all_labels, _ = self._gather(labels.float())
            targets = soft_targets(label_similarity(labels, all_labels, s.label_similarity),
                                   offset)
        return (soft_contrastive_loss(q1, k2, targets, s.temperature, s.soft_weight, offset)
                + soft_contrastive_loss(q2, k1, targets, s.temperature, s.soft_weight, offset))

    def pretrain_loss(self, batch: dict, generator_seed: int | None = None) -> torch.Tensor:
        noise: tuple = (None, None)
        if generator_seed is not None and self.mask_ratio > 0:  # validation: a fixed mask
            g = torch.Generator().manual_seed(generator_seed)
            n, grid = batch["view1"].shape[0], self.encoder.patch_embed.num_patches
            noise = tuple(torch.rand(n, grid, generator=g).to(self.device) for _ in range(2))
        if self.training:
            self.momentum_step()
        return self(batch["view1"], batch["view2"], batch.get("label"), noise)

    def validation_step(self, batch, batch_idx: int):
        """Validation batches through the eval transform have one view: no loss to take."""
        if "view1" not in batch:
            return None
        return super().validation_step(batch, batch_idx)
