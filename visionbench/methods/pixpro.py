"""PixPro: "Propagate Yourself: Exploring Pixel-Level Consistency for Unsupervised Visual
Representation Learning" (Xie et al., CVPR 2021, arXiv 2011.10043).

Follows zdaxie/PixPro (read at commit e390d6b):

- ``contrast/models/PixPro.py``: the online ResNet's C5 map (``head_type='early_return'``; here
  timm's ``forward_features``) goes through the projector ``MLP2d`` (1x1 conv 2048 -> 4096, BN,
  ReLU, 1x1 conv -> 256, convolutions with bias, PyTorch default init) and the pixel
  propagation module ``featprop``: ``s_ij = clamp(cos(x_i, x_j), clamp_value) ** p`` (``+1e-6``
  first when ``p < 1``), ``y_i = sum_j s_ij g(x_j)`` with ``g`` the value transform (layer 0:
  identity, 1: a 1x1 conv, 2: ``MLP2d(256, 256, 256)``) applied then L2-normalized, and ``y``
  L2-normalized again. The momentum encoder and projector (copies, no gradient) give the
  L2-normalized keys. ``regression_loss`` maps the 7x7 bin centres of both views to image
  coordinates, marks pairs whose distance over the larger bin diagonal of the two views is
  below ``pos_ratio`` as positives and averages ``-2 <y_i, z'_j>`` over them per image, then
  over the batch, symmetric over the views. The instance branch (``ins_loss_weight > 0``):
  a second projector with a momentum copy, a predictor ``MLP2d(256, 4096, 256)`` on the online
  side, average pooling, BYOL's ``-2 <p, z'>`` symmetric, added with that weight. Momentum
  ``1 - (1 - base) (cos(pi k / K) + 1) / 2`` at step ``k`` of ``K``, applied to the parameters
  (not the buffers) of the key encoder, projector and instance projector once per step before
  the keys are computed. SyncBatchNorm everywhere.
- ``contrast/data/transform.py`` (``aug_type == 'BYOL'``) and ``transform_coord.py``:
  ``RandomResizedCropCoord`` (bilinear) returning ``[j / (W-1), i / (H-1), (j+w-1) / (W-1),
  (i+h-1) / (H-1)]`` of the original image, ``RandomHorizontalFlipCoord`` swapping x1 and x2,
  colour jitter (0.4, 0.4, 0.2, 0.1) with p 0.8, grayscale p 0.2, PIL Gaussian blur with
  sigma ~ U(0.1, 2) with p 1.0 (view 1) / 0.1 (view 2), solarize (threshold 128) p 0.2 on
  view 2 only; ``contrast/data/dataset.py`` returns both views and both boxes.
- ``main_pretrain.py`` / ``contrast/lars.py`` / ``contrast/option.py`` /
  ``tools/pixpro_base_r50_100ep.sh`` / ``contrast/lr_scheduler.py``: LARS over SGD (momentum
  0.9) with ``add_weight_decay`` groups (see ``visionbench.methods.lars``), lr = base lr 1.0 x
  batch / 256, weight decay 1e-5, 5 warmup epochs then cosine to 1e-6, 100 epochs, crop scale
  (0.08, 1), ``--pixpro-p 2 --pixpro-momentum 0.99 --pixpro-pos-ratio 0.7
  --pixpro-transform-layer 1 --pixpro-ins-loss-weight 0``; batch 128 x 8 GPUs.

Deviations from the official code:

- Warmup: the harness's linear warmup starts from 0 (official ``GradualWarmupScheduler`` with
  ``warmup_multiplier 100`` starts from lr / 100); the cosine then runs from the peak lr to
  ``min_lr`` (official ``eta_min`` 1e-6, the default here), per step as the official.
- ``K`` is the trainer's optimizer steps per epoch x epochs and ``k`` its ``global_step``
  (official: ``num_instances / world / batch x epochs`` and a counter, one per forward); ``k``
  is clamped at ``K``. With gradient accumulation the update runs once per optimizer step, on
  its first micro-batch. Outside a trainer the base momentum is used.
- The instance branch pools with a mean over the whole map (official ``AvgPool2d(7, stride=1)``,
  the same at 224 px, where C5 is 7x7; it would not pool to one vector at other sizes).
- SyncBatchNorm: not converted here; ``sync_batchnorm = True`` asks the runner to pass
  ``sync_batchnorm=True`` to Lightning's Trainer, which converts every BatchNorm of the module
  (encoders, projectors, value transform, predictor), as the official converts them.
- The momentum encoder is a ``deepcopy`` of the online one (buffers copied too; the official
  builds a second network, copies the parameters and keeps its freshly initialized buffers).
- Random numbers come from torch (crop, flip, blur sigma), not from Python's ``random`` and
  NumPy, so DataLoader workers are seeded by torch; the crop is sampled by torchvision's
  ``RandomResizedCrop.get_params``, the algorithm the official ``get_params`` copies. Images
  are converted to ``L`` for ``in_chans`` 1 and to ``RGB`` otherwise; other channel counts are
  adapted after ``ToTensor`` as the datamodule does, and mean / std come from the data section
  (official: ImageNet's). A 1-pixel wide or high image divides by 1, not 0.
- ``effective_batch_size`` stays None (the batch is the data section's x devices; official
  1024 = 128 x 8 GPUs): gradient accumulation would not give the BatchNorm statistics of the
  larger batch.
- In ``regression_loss`` the positive mask takes the features' dtype where that is wider than
  float32 (official: always float32), so a float64 check is exact.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter
from pydantic import Field
from timm.models.resnet import ResNet
from timm.models.resnetv2 import ResNetV2
from torch import nn
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from visionbench.data.datamodule import AdaptChannels, ToChannels, per_channel
from visionbench.errors import ConfigError
from visionbench.methods.base import PretrainModule
from visionbench.methods.lars import LARS, add_weight_decay
from visionbench.methods.registry import register_method
from visionbench.methods.schedule import momentum_at
from visionbench.schema import CropScale, MethodConfig


class PixProConfig(MethodConfig):
    """PixPro's section; defaults are ``tools/pixpro_base_r50_100ep.sh`` (the paper's 100-epoch
    run), else ``contrast/option.py`` / ``contrast/lars.py`` / ``contrast/lr_scheduler.py``."""

    method: Literal["pixpro"] = "pixpro"
    epochs: int = Field(100, gt=0)  # --epochs 100
    warmup_epochs: float = Field(5, ge=0)  # --warmup-epoch 5
    blr: float = Field(1.0, gt=0)  # --base-lr 1.0 (lr = blr x batch / 256)
    weight_decay: float = Field(1e-5, ge=0)  # --weight-decay 1e-5
    min_lr: float = Field(1e-6, ge=0)  # lr_scheduler.py: CosineAnnealingLR(eta_min=1e-6)
    sgd_momentum: float = Field(0.9, ge=0, lt=1)  # option.py --momentum 0.9 (LARS's SGD)
    trust_coef: float = Field(1e-3, ge=0)  # lars.py LARS(trust_coef=0.001)
    lars_eps: float = Field(1e-8, ge=0)  # lars.py LARS(eps=1e-8)
    momentum_base: float = Field(0.99, ge=0, le=1)  # --pixpro-momentum 0.99
    pos_ratio: float = Field(0.7, gt=0)  # --pixpro-pos-ratio 0.7
    gamma: float = Field(2.0, gt=0)  # --pixpro-p 2 (sharpness of the propagation)
    clamp_value: float = 0.0  # --pixpro-clamp-value 0 (option.py default)
    transform_layer: Literal[0, 1, 2] = 1  # --pixpro-transform-layer 1
    ins_loss_weight: float = Field(0.0, ge=0)  # --pixpro-ins-loss-weight 0.
    proj_hidden_dim: int = Field(4096, gt=0)  # Proj_Head / Pred_Head inner_dim
    proj_dim: int = Field(256, gt=0)  # Proj_Head / Pred_Head out_dim
    crop_scale: CropScale = (0.08, 1.0)  # --crop 0.08


# -- data ------------------------------------------------------------------------------------


def crop_coords(i: int, j: int, h: int, w: int, height: int, width: int) -> torch.Tensor:
    """The box ``[x1, y1, x2, y2]`` of a crop (top ``i``, left ``j``, ``h`` x ``w``) in an image
    of ``height`` x ``width``, normalized as ``RandomResizedCropCoord.__call__``: pixel indices
    of the first and last column / row over ``width - 1`` / ``height - 1``."""
    wd, hd = float(max(width - 1, 1)), float(max(height - 1, 1))
    return torch.tensor([j / wd, i / hd, (j + w - 1) / wd, (i + h - 1) / hd])


class RandomResizedCropCoord:
    """Official ``RandomResizedCropCoord``: a random resized crop (bilinear) and its box."""

    def __init__(self, size: int, scale: Sequence[float] = (0.08, 1.0),
                 ratio: Sequence[float] = (3.0 / 4.0, 4.0 / 3.0)) -> None:
        self.size = (size, size)
        self.scale = list(scale)
        self.ratio = list(ratio)

    def __call__(self, img: Image.Image) -> tuple[Image.Image, torch.Tensor]:
        i, j, h, w = T.RandomResizedCrop.get_params(img, self.scale, self.ratio)
        width, height = img.size
        coord = crop_coords(i, j, h, w, height, width)
        out = TF.resized_crop(img, i, j, h, w, list(self.size), T.InterpolationMode.BILINEAR)
        return out, coord

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, scale={self.scale}, ratio={self.ratio})"


class RandomHorizontalFlipCoord:
    """Official ``RandomHorizontalFlipCoord``: a flip with probability ``p`` swaps x1 and x2."""

    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def __call__(self, img: Image.Image, coord: torch.Tensor) -> tuple[Image.Image, torch.Tensor]:
        if torch.rand(1).item() < self.p:
            coord = coord[[2, 1, 0, 3]].clone()
            return TF.hflip(img), coord
        return img, coord

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p})"


class GaussianBlur:
    """Official ``GaussianBlur`` ("version 2"): PIL blur of radius sigma ~ U(0.1, 2.0)."""

    def __init__(self, sigma: Sequence[float] = (0.1, 2.0)) -> None:
        self.sigma = tuple(sigma)

    def __call__(self, img: Image.Image) -> Image.Image:
        sigma = float(torch.empty(1).uniform_(self.sigma[0], self.sigma[1]))
        return img.filter(ImageFilter.GaussianBlur(radius=sigma))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(sigma={self.sigma})"


class CoordView:
    """One view as ``transform_coord.Compose``: crop with box, flip with box, then the
    photometric transforms; returns ``(image tensor, box)``."""

    def __init__(self, crop: RandomResizedCropCoord, flip: RandomHorizontalFlipCoord,
                 photometric: T.Compose) -> None:
        self.crop = crop
        self.flip = flip
        self.photometric = photometric

    def __call__(self, img: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        img, coord = self.crop(img)
        img, coord = self.flip(img, coord)
        return self.photometric(img), coord


class PixProTransform:
    """Official ``get_transform('BYOL', crop, image_size)``: two asymmetric views of one image
    with their boxes, as a sample dict ``{view1, view2, coords1, coords2}``."""

    def __init__(self, image_size: int, in_chans: int = 3,
                 mean: Sequence[float] = (0.485, 0.456, 0.406),
                 std: Sequence[float] = (0.229, 0.224, 0.225),
                 crop_scale: Sequence[float] = (0.08, 1.0)) -> None:
        # the photometric ops see "L" or "RGB"; AdaptChannels brings other counts back
        self.to_channels = ToChannels(1 if in_chans == 1 else 3)
        tail = [T.ToTensor(), AdaptChannels(in_chans),
                T.Normalize(per_channel(mean, in_chans, "mean"), per_channel(std, in_chans, "std"))]

        def photometric(blur_p: float, solarize_p: float) -> T.Compose:
            ops = [
                T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
                T.RandomGrayscale(p=0.2),
                T.RandomApply([GaussianBlur()], p=blur_p),
            ]
            if solarize_p > 0:
                ops.append(T.RandomSolarize(128, p=solarize_p))  # ImageOps.solarize default
            return T.Compose(ops + tail)

        self.view1 = CoordView(RandomResizedCropCoord(image_size, crop_scale),
                               RandomHorizontalFlipCoord(), photometric(1.0, 0.0))
        self.view2 = CoordView(RandomResizedCropCoord(image_size, crop_scale),
                               RandomHorizontalFlipCoord(), photometric(0.1, 0.2))

    def __call__(self, sample: dict) -> dict:
        img = self.to_channels(sample["image"])
        view1, coords1 = self.view1(img)
        view2, coords2 = self.view2(img)
        return {"view1": view1, "view2": view2, "coords1": coords1, "coords2": coords2}


# -- loss ------------------------------------------------------------------------------------


def bin_centers(coords: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Image coordinates ``(x, y)``, each ``(N, h*w)`` row-major, of the centres of the
    ``h`` x ``w`` feature bins of boxes ``coords`` ``(N, 4)`` (a flipped box, x1 > x2, runs its
    columns right to left), as ``regression_loss``."""
    xs = torch.arange(w, dtype=coords.dtype, device=coords.device).view(1, 1, w)
    ys = torch.arange(h, dtype=coords.dtype, device=coords.device).view(1, h, 1)
    bin_w = ((coords[:, 2] - coords[:, 0]) / w).view(-1, 1, 1)
    bin_h = ((coords[:, 3] - coords[:, 1]) / h).view(-1, 1, 1)
    cx = (xs + 0.5) * bin_w + coords[:, 0].view(-1, 1, 1)
    cy = (ys + 0.5) * bin_h + coords[:, 1].view(-1, 1, 1)
    return cx.expand(-1, h, w).reshape(-1, h * w), cy.expand(-1, h, w).reshape(-1, h * w)


def positive_mask(coord_q: torch.Tensor, coord_k: torch.Tensor, h: int, w: int,
                  pos_ratio: float) -> torch.Tensor:
    """``(N, h*w, h*w)`` float mask: 1 where the distance between bin ``i`` of the query view and
    bin ``j`` of the key view, over the larger bin diagonal of the two views, is below
    ``pos_ratio``."""
    diag_q = torch.sqrt(((coord_q[:, 2] - coord_q[:, 0]) / w) ** 2
                        + ((coord_q[:, 3] - coord_q[:, 1]) / h) ** 2)
    diag_k = torch.sqrt(((coord_k[:, 2] - coord_k[:, 0]) / w) ** 2
                        + ((coord_k[:, 3] - coord_k[:, 1]) / h) ** 2)
    max_diag = torch.max(diag_q, diag_k).view(-1, 1, 1)
    qx, qy = bin_centers(coord_q, h, w)
    kx, ky = bin_centers(coord_k, h, w)
    dist = torch.sqrt((qx.unsqueeze(2) - kx.unsqueeze(1)) ** 2
                      + (qy.unsqueeze(2) - ky.unsqueeze(1)) ** 2) / max_diag
    return (dist < pos_ratio).float().detach()


def pixel_regression_loss(q: torch.Tensor, k: torch.Tensor, coord_q: torch.Tensor,
                          coord_k: torch.Tensor, pos_ratio: float = 0.7) -> torch.Tensor:
    """Official ``regression_loss``: ``-2`` x the mean over images of the mean of
    ``<q_i, k_j>`` over positive pairs (``q``, ``k``: ``(N, C, H, W)``, L2-normalized)."""
    n, c, h, w = q.shape
    logit = torch.bmm(q.reshape(n, c, -1).transpose(1, 2), k.reshape(n, c, -1))
    # float32 as official (``.float()``), float64 with float64 features
    mask = positive_mask(coord_q, coord_k, h, w, pos_ratio)
    mask = mask.to(torch.promote_types(logit.dtype, torch.float32))
    loss = (logit * mask).sum(-1).sum(-1) / (mask.sum(-1).sum(-1) + 1e-6)
    return -2 * loss.mean()


def instance_regression_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Official ``PixPro.regression_loss``: ``-2 <p, z>`` averaged over the batch."""
    return -2.0 * torch.einsum("nc,nc->n", p, z).mean()


# -- model -----------------------------------------------------------------------------------


class MLP2d(nn.Module):
    """Official ``MLP2d``: 1x1 conv (bias) -> BN -> ReLU -> 1x1 conv (bias), same names."""

    def __init__(self, in_dim: int, inner_dim: int = 4096, out_dim: int = 256) -> None:
        super().__init__()
        self.linear1 = nn.Conv2d(in_dim, inner_dim, kernel_size=1, bias=True)
        self.bn1 = nn.BatchNorm2d(inner_dim)
        self.relu1 = nn.ReLU(inplace=True)
        self.linear2 = nn.Conv2d(inner_dim, out_dim, kernel_size=1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.relu1(self.bn1(self.linear1(x))))


def value_transform(layer: int, dim: int) -> nn.Module:
    """``pixpro_transform_layer``: 0 identity, 1 a 1x1 conv, 2 ``MLP2d(dim, dim, dim)``."""
    if layer == 0:
        return nn.Identity()
    if layer == 1:
        return nn.Conv2d(dim, dim, kernel_size=1, bias=True)
    if layer == 2:
        return MLP2d(dim, dim, dim)
    raise ConfigError(f"pretrain.transform_layer: {layer} (expected 0, 1 or 2)")


def _frozen_copy(module: nn.Module) -> nn.Module:
    twin = copy.deepcopy(module)
    for param in twin.parameters():
        param.requires_grad = False
    return twin


def _is_resnet(encoder: nn.Module) -> bool:
    return isinstance(encoder, (ResNet, ResNetV2))


@register_method
class PixPro(PretrainModule):
    """PixPro around a headless timm ResNet (``module.encoder``, the backbone evaluated)."""

    config = PixProConfig
    families = ("resnet",)
    sync_batchnorm = True  # the runner passes Trainer(sync_batchnorm=True) under DDP

    def __init__(self, encoder: nn.Module, section: PixProConfig | None = None, *,
                 batch_size: int = 64, backbone: str | None = None) -> None:
        section = PixProConfig() if section is None else section
        if not _is_resnet(encoder):
            name = backbone or type(encoder).__name__
            raise ConfigError(f"model.backbone: pixpro pretrains the families "
                              f"{', '.join(self.families)}, not {name}")
        super().__init__(section, batch_size=batch_size)
        self.section = section
        self.momentum_base = section.momentum_base
        self.pos_ratio = section.pos_ratio
        self.gamma = section.gamma
        self.clamp_value = section.clamp_value
        self.ins_loss_weight = section.ins_loss_weight
        dim, hidden, out = int(encoder.num_features), section.proj_hidden_dim, section.proj_dim

        self.encoder = encoder
        self.projector = MLP2d(dim, hidden, out)
        self.encoder_k = _frozen_copy(encoder)
        self.projector_k = _frozen_copy(self.projector)
        self.value_transform = value_transform(section.transform_layer, out)
        if self.ins_loss_weight > 0:
            self.projector_instance = MLP2d(dim, hidden, out)
            self.projector_instance_k = _frozen_copy(self.projector_instance)
            self.predictor = MLP2d(out, hidden, out)
        self._momentum_step_done = -1

    @classmethod
    def from_config(cls, encoder, section, model, data) -> PixPro:
        return cls(encoder, section, batch_size=data.batch_size,
                   backbone=getattr(model, "backbone", None))

    @classmethod
    def train_transform(cls, section, data) -> PixProTransform:
        return PixProTransform(data.image_size, data.in_chans, data.mean, data.std,
                               crop_scale=section.crop_scale)

    # -- momentum encoder ----------------------------------------------------------------------
    def _pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        pairs = [(self.encoder, self.encoder_k), (self.projector, self.projector_k)]
        if self.ins_loss_weight > 0:
            pairs.append((self.projector_instance, self.projector_instance_k))
        return pairs

    def total_steps(self) -> int:
        """``K``: optimizer steps per epoch x epochs."""
        return self.steps_per_epoch() * self.epochs

    @torch.no_grad()
    def update_momentum_encoder(self, momentum: float) -> None:
        """Key parameters <- ``m`` key + ``(1 - m)`` online (buffers untouched, as official)."""
        for online, key in self._pairs():
            for p_q, p_k in zip(online.parameters(), key.parameters(), strict=True):
                p_k.mul_(momentum).add_(p_q.detach(), alpha=1.0 - momentum)

    def momentum_step(self) -> float | None:
        """The once-per-optimizer-step momentum update; returns the momentum used, or None
        when this step's update already ran (later micro-batches of an accumulated step)."""
        if self._trainer is None:
            m = self.momentum_base
        else:
            step = self.global_step
            if step == self._momentum_step_done:
                return None
            self._momentum_step_done = step
            m = momentum_at(step, self.total_steps(), self.momentum_base)
        self.update_momentum_encoder(m)
        return m

    # -- model -----------------------------------------------------------------------------------
    def featprop(self, feat: torch.Tensor) -> torch.Tensor:
        """The pixel propagation module (official ``featprop``)."""
        n, c, h, w = feat.shape
        value = F.normalize(self.value_transform(feat), dim=1).reshape(n, c, -1)
        feat = F.normalize(feat, dim=1).reshape(n, c, -1)
        attention = torch.bmm(feat.transpose(1, 2), feat)
        attention = torch.clamp(attention, min=self.clamp_value)
        if self.gamma < 1.0:
            attention = attention + 1e-6
        attention = attention**self.gamma
        return torch.bmm(value, attention.transpose(1, 2)).reshape(n, c, h, w)

    def forward(self, view1: torch.Tensor, view2: torch.Tensor, coords1: torch.Tensor,
                coords2: torch.Tensor) -> torch.Tensor:
        """The loss of official ``PixPro.forward`` without the momentum update."""
        feat_1 = self.encoder.forward_features(view1)
        pred_1 = F.normalize(self.featprop(self.projector(feat_1)), dim=1)
        feat_2 = self.encoder.forward_features(view2)
        pred_2 = F.normalize(self.featprop(self.projector(feat_2)), dim=1)
        if self.ins_loss_weight > 0:
            pred_ins_1 = F.normalize(self.predictor(self.projector_instance(feat_1))
                                     .mean(dim=(2, 3)), dim=1)
            pred_ins_2 = F.normalize(self.predictor(self.projector_instance(feat_2))
                                     .mean(dim=(2, 3)), dim=1)

        with torch.no_grad():
            feat_1_k = self.encoder_k.forward_features(view1)
            proj_1_k = F.normalize(self.projector_k(feat_1_k), dim=1)
            feat_2_k = self.encoder_k.forward_features(view2)
            proj_2_k = F.normalize(self.projector_k(feat_2_k), dim=1)
            if self.ins_loss_weight > 0:
                ins_1_k = F.normalize(self.projector_instance_k(feat_1_k).mean(dim=(2, 3)),
                                      dim=1)
                ins_2_k = F.normalize(self.projector_instance_k(feat_2_k).mean(dim=(2, 3)),
                                      dim=1)

        loss = (pixel_regression_loss(pred_1, proj_2_k, coords1, coords2, self.pos_ratio)
                + pixel_regression_loss(pred_2, proj_1_k, coords2, coords1, self.pos_ratio))
        if self.ins_loss_weight > 0:
            loss_ins = (instance_regression_loss(pred_ins_1, ins_2_k)
                        + instance_regression_loss(pred_ins_2, ins_1_k))
            loss = loss + self.ins_loss_weight * loss_ins
        return loss

    def validation_step(self, batch, batch_idx: int):
        """Validation images come through the eval transform: without two views there is no
        PixPro loss to take (the official code validates nothing)."""
        if "view1" not in batch:
            return None
        return super().validation_step(batch, batch_idx)

    def pretrain_loss(self, batch: dict, generator_seed: int | None = None) -> torch.Tensor:
        """Momentum update (training only, once per step), then the loss; ``generator_seed`` is
        unused: the loss itself draws no random numbers."""
        if self.training:
            self.momentum_step()
        return self(batch["view1"], batch["view2"], batch["coords1"], batch["coords2"])

    # -- optimizer -------------------------------------------------------------------------------
    def optimizer_groups(self) -> list[dict]:
        return add_weight_decay(self, self.weight_decay)

    def make_optimizer(self, groups: list[dict], lr: float) -> LARS:
        return LARS(groups, lr=lr, momentum=self.section.sgd_momentum,
                    eps=self.section.lars_eps, trust_coef=self.section.trust_coef)
