"""Selfie: "Selfie: Self-supervised Pretraining for Image Embedding" (Trinh, Luong, Le,
arXiv 1906.02940, v3).

There is no official code: this follows the paper's text. What it builds, by section:

- Sec. 2 / Fig. 1: an image is cut into a grid of non-overlapping patches; some are masked
  out. The *encoder* summarises the visible (context) patches into one vector ``u``; the
  *decoder* must pick, for a masked location, the right patch among the masked patches of the
  same image (the others are the "distractors"). Encoder and decoder share the patch processing
  network P and are trained jointly (the decoder has no other parameters).
- Sec. 2.1 "Patch sampling method": 8 px patches on 32 px images (a 4 x 4 grid, 16 patches),
  32 px patches on 224 px images (7 x 7, 49 patches); the patch size divides the image.
  "To add more randomness to the position of the image patches", 32 px images are zero-padded
  by 4 px and randomly cropped back to 32 px (``train_transform``).
- Sec. 2.1 "Patch processing network": P is the first three blocks of ResNet-50 (stem +
  ``layer1``..``layer3``, "conv1" through "conv4_x"), then global average pooling: one
  1024-d vector ``h`` per patch. Here P *is* those modules of ``module.encoder`` (the whole
  headless ResNet), so the saved encoder is the fine-tune ResNet-50 whose first three stages
  are P; ``layer4`` is never run, gets no gradient and keeps its initialisation (Sec. 2,
  fine-tuning: the pretrained convolutional weights are reused, the rest starts from init).
- Sec. 2.1 "Efficient implementation of mask prediction": the decoder predicts every masked
  location at once, each against the same candidate set, all masked patches of the image.
- Sec. 2.2 "Attention pooling": ``u, h_1^out, .., h_n^out = TransformerLayers(u_0, h_1, ..,
  h_n)`` over the context patches with a learned ``u_0``; only ``u`` is kept.
  "Positional embedding": a learned embedding per location, the 16 of a 4 x 4 grid learned
  whole, the 49 of a 7 x 7 grid decomposed into row + column embeddings (7 + 7 = 14 vectors);
  the query for masked location ``i`` is ``v_i = u + p_i``.
- Loss (Sec. 2, after CPC, Oord et al. 2018): cross-entropy over the logits ``<v_i, h_j>``,
  ``j`` over the masked patches of the same image, the true patch of location ``i`` the target;
  averaged over masked locations and images (``selfie_loss``).

Where the paper text this follows was confirmed: only the abstract and a secondary summary of
Secs. 2-2.2 could be read while writing this (patch sizes, P = ResNet-50's first three
blocks, the pooling equation, per-location embeddings, Fig. 1's 3-of-9 example); every other
value below is marked "assumed" and is configurable.

Deviations and assumptions (the paper is silent, or its text was not at hand):

- Masked count: ``num_masked`` (default: a third of the grid, rounded: 5 of 16, 16 of 49, the
  ratio of Fig. 1's worked example, 3 of 9). Assumed.
- Attention pooling: ``depth`` 3 post-norm Transformer layers (Vaswani et al. 2017: ReLU
  feed-forward of ``mlp_ratio`` x width, dropout 0.1) of width = P's output (1024 for ResNet-50,
  as the dot product with ``h_j`` requires) and 16 heads. Depth, heads, feed-forward width and
  dropout are assumed.
- The context patches enter the pooling without position embeddings (the pooling equation
  shows none); ``context_pos_embed=True`` adds the same learned ``p_j`` to them.
- Position embeddings and ``u_0`` start at N(0, 0.02) (BERT's init), assumed; they and biases /
  1-D parameters get no weight decay (timm's ViT convention), assumed.
- Optimizer and schedule: SGD, Nesterov momentum 0.9, ``blr`` 0.1 (lr = blr x batch / 256,
  Goyal et al.'s ResNet-50 rule), weight decay 1e-4, 100 epochs with 5 warmup then the shared
  half-cycle cosine; all assumed (the standard ResNet-50 recipe), ``optimizer="adamw"``
  (betas 0.9, 0.999) is the alternative.
- Augmentation beyond the 32 px pad-and-crop: a horizontal flip, and for large images
  RandomResizedCrop(image_size) + flip (the usual ImageNet preprocessing); assumed.
- P runs per patch on the unmodified ImageNet ResNet stem, and its BatchNorm (or the model's
  conv norm) takes statistics over all patches of the batch. Only v1 (timm ``ResNet``)
  encoders are supported; the pre-activation ``ResNetV2`` (EvoNorm) is refused.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from timm.models.resnet import ResNet
from torch import nn

from visionbench.backbones import create_backbone, read_state_dict
from visionbench.data.datamodule import AdaptChannels, ToChannels, per_channel
from visionbench.errors import ConfigError, WeightsError
from visionbench.methods.base import PretrainModule
from visionbench.methods.registry import register_method
from visionbench.methods.schedule import weight_decay_groups
from visionbench.schema import MethodConfig

PAPER_PATCH_SIZE = {32: 8, 224: 32}  # Sec. 2.1: image size -> patch size
MASKED_FRACTION = 1 / 3  # Fig. 1's example: 3 of 9 patches go to the decoder (assumed ratio)
P_MODULES = ("conv1", "bn1", "act1", "maxpool", "layer1", "layer2", "layer3")  # Sec. 2.1's P


class SelfieConfig(MethodConfig):
    """Selfie pretraining. Paper values: ``patch_size`` (Sec. 2.1: 8 at 32 px, 32 at 224 px;
    None picks them), ``pos_embed`` (Sec. 2.2: whole table on 4 x 4, row + column on 7 x 7;
    "auto"), ``crop`` (Sec. 2.1: 4 px zero pad + random crop at 32 px). Assumed (see the
    module docstring): ``num_masked`` (None: a third of the grid), ``depth`` 3, ``num_heads``
    16, ``mlp_ratio`` 4, ``dropout`` 0.1, ``context_pos_embed`` off, SGD Nesterov 0.9, blr 0.1,
    weight decay 1e-4, 100 epochs, 5 warmup."""

    method: Literal["selfie"] = "selfie"
    epochs: int = Field(100, gt=0)
    warmup_epochs: float = Field(5, ge=0)
    blr: float = Field(0.1, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    patch_size: int | None = Field(None, gt=0)
    num_masked: int | None = Field(None, ge=2)
    depth: int = Field(3, gt=0)
    num_heads: int = Field(16, gt=0)
    mlp_ratio: float = Field(4.0, gt=0)
    dropout: float = Field(0.1, ge=0, lt=1)
    pos_embed: Literal["auto", "full", "row_col"] = "auto"
    context_pos_embed: bool = False
    optimizer: Literal["sgd", "adamw"] = "sgd"
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    crop: Literal["auto", "pad", "resized"] = "auto"
    crop_padding: int = Field(4, ge=0)


# -- patches and masks -------------------------------------------------------------------------


def resolve_patch_size(image_size: int, patch_size: int | None) -> int:
    """``patch_size``, or the paper's for ``image_size`` (Sec. 2.1); it must divide the image."""
    if patch_size is None:
        if image_size not in PAPER_PATCH_SIZE:
            raise ConfigError(
                f"pretrain.patch_size: the paper sets it for 32 px (8) and 224 px (32) images "
                f"only; set it for {image_size} px images"
            )
        patch_size = PAPER_PATCH_SIZE[image_size]
    if image_size % patch_size or patch_size > image_size:
        raise ConfigError(
            f"pretrain.patch_size: {patch_size} does not divide the {image_size} px image "
            "into a grid"
        )
    return patch_size


def resolve_num_masked(num_patches: int, num_masked: int | None) -> int:
    """``num_masked``, or a third of the grid; at least two (the true patch and a distractor)
    and at most all but one patch (the context)."""
    k = round(num_patches * MASKED_FRACTION) if num_masked is None else num_masked
    if not 2 <= k <= num_patches - 1:
        raise ConfigError(
            f"pretrain.num_masked: {k} for a {num_patches}-patch grid; expected 2 to "
            f"{num_patches - 1} (a true patch and a distractor, and one context patch)"
        )
    return k


def extract_patches(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, L, C, p, p), patches in row-major grid order."""
    b, c, h, w = imgs.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {p}")
    x = imgs.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // p) * (w // p), c, p, p)


def sample_masks(
    batch: int, num_patches: int, num_masked: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(masked indices (B, num_masked), context indices (B, L - num_masked)), each sorted;
    a uniformly random subset per image, drawn on the CPU from ``generator`` (or the global
    generator), so a seed fixes the split."""
    noise = torch.rand(batch, num_patches, generator=generator)
    order = noise.argsort(dim=1)
    masked = order[:, :num_masked].sort(dim=1).values
    context = order[:, num_masked:].sort(dim=1).values
    return masked, context


def _gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows ``idx`` (B, k) of ``x`` (B, L, D) -> (B, k, D)."""
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


# -- loss --------------------------------------------------------------------------------------


def selfie_logits(u: torch.Tensor, pos: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Logits (B, k, k): ``<u_b + p_i, h_j>`` for query location i and candidate patch j, the
    candidates being the k masked patches of the same image (Sec. 2.1-2.2); half-precision
    inputs are computed in float32."""
    dtype = torch.promote_types(torch.promote_types(u.dtype, targets.dtype), torch.float32)
    v = u.unsqueeze(1).to(dtype) + pos.to(dtype)
    return torch.einsum("bid,bjd->bij", v, targets.to(dtype))


def selfie_loss(u: torch.Tensor, pos: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of picking patch i for masked location i among the image's k masked
    patches, mean over locations and images. ``u`` (B, D) pooled context, ``pos`` (B, k, D)
    the masked locations' embeddings, ``targets`` (B, k, D) the masked patches' P features,
    in the same order as ``pos``."""
    logits = selfie_logits(u, pos, targets)
    b, k, _ = logits.shape
    labels = torch.arange(k, device=logits.device).expand(b, k)
    return F.cross_entropy(logits.reshape(b * k, k), labels.reshape(-1))


# -- networks ----------------------------------------------------------------------------------


def patch_network_dim(encoder: ResNet) -> int:
    """Width of P's output: the channels of ``layer3`` (1024 for ResNet-50)."""
    for info in encoder.feature_info:
        if info["module"] == "layer3":
            return int(info["num_chs"])
    raise ConfigError("Selfie: the ResNet has no layer3 to end the patch network at")


def patch_features(encoder: ResNet, patches: torch.Tensor) -> torch.Tensor:
    """P (Sec. 2.1): the encoder's stem + ``layer1``..``layer3`` on (N, C, p, p) patches, then
    global average pooling -> (N, D)."""
    x = patches
    for name in P_MODULES:
        x = getattr(encoder, name)(x)
    return x.mean(dim=(2, 3))


class AttentionPooling(nn.Module):
    """Sec. 2.2: ``u = TransformerLayers(u_0, h_1, .., h_n)[0]`` with a learned ``u_0``."""

    def __init__(self, dim: int, depth: int, num_heads: int, mlp_ratio: float = 4.0,
                 dropout: float = 0.1) -> None:
        super().__init__()
        if dim % num_heads:
            raise ConfigError(f"pretrain.num_heads: {num_heads} does not divide the patch "
                              f"network's width {dim}")
        self.u0 = nn.Parameter(torch.zeros(1, 1, dim))
        layer = nn.TransformerEncoderLayer(
            dim, num_heads, dim_feedforward=int(dim * mlp_ratio), dropout=dropout,
            activation="relu", batch_first=True, norm_first=False,
        )
        self.layers = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        nn.init.normal_(self.u0, std=0.02)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """(B, n, D) context features -> u (B, D)."""
        x = torch.cat([self.u0.expand(h.shape[0], -1, -1), h], dim=1)
        return self.layers(x)[:, 0]


class PatchPositions(nn.Module):
    """Sec. 2.2: a learned embedding per grid location, the whole table (``full``) or the sum
    of a row and a column embedding (``row_col``)."""

    def __init__(self, grid: int, dim: int, mode: Literal["full", "row_col"]) -> None:
        super().__init__()
        self.grid, self.mode = grid, mode
        if mode == "full":
            self.table = nn.Parameter(torch.empty(grid * grid, dim).normal_(std=0.02))
        elif mode == "row_col":
            self.rows = nn.Parameter(torch.empty(grid, dim).normal_(std=0.02))
            self.cols = nn.Parameter(torch.empty(grid, dim).normal_(std=0.02))
        else:
            raise ConfigError(f"pretrain.pos_embed: {mode!r} (expected full or row_col)")

    def embeddings(self) -> torch.Tensor:
        """(L, D), location ``r * grid + c`` at row r, column c."""
        if self.mode == "full":
            return self.table
        return (self.rows[:, None, :] + self.cols[None, :, :]).reshape(self.grid ** 2, -1)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, k) location indices -> (B, k, D)."""
        return self.embeddings()[idx]


# -- the method --------------------------------------------------------------------------------


def _check_resnet(encoder: nn.Module, backbone: str | None = None) -> ResNet:
    if isinstance(encoder, ResNet):
        return encoder
    name = backbone or type(encoder).__name__
    if type(encoder).__name__ == "ResNetV2":
        raise ConfigError(
            f"model.backbone: Selfie's patch network is a v1 ResNet's stem + layer1..layer3; "
            f"{name} is a pre-activation ResNetV2, which it does not support"
        )
    raise ConfigError(f"model.backbone: Selfie pretrains backbones of the families "
                      f"{', '.join(Selfie.families)}, not {name}")


@register_method
class Selfie(PretrainModule):
    """Selfie around a headless timm ResNet encoder (``num_classes=0``); P is its stem +
    ``layer1``..``layer3``, ``layer4`` stays at its initialisation (frozen here)."""

    config = SelfieConfig
    families = ("resnet",)

    def __init__(self, encoder: ResNet, section: SelfieConfig | None = None, *,
                 image_size: int = 32, batch_size: int = 128) -> None:
        section = section or SelfieConfig()
        adam = section.optimizer == "adamw"
        super().__init__(section, batch_size=batch_size,
                         betas=(0.9, 0.999) if adam else (0.9, 0.95))
        self.encoder = _check_resnet(encoder)
        self.section = section
        self.image_size = image_size
        self.patch_size = resolve_patch_size(image_size, section.patch_size)
        self.grid = image_size // self.patch_size
        self.num_patches = self.grid ** 2
        self.num_masked = resolve_num_masked(self.num_patches, section.num_masked)
        self.dim = patch_network_dim(self.encoder)
        mode = section.pos_embed
        if mode == "auto":  # Sec. 2.2: 16 learned whole, 49 as 7 rows + 7 columns
            mode = "full" if self.grid <= 4 else "row_col"
        self.pooling = AttentionPooling(self.dim, section.depth, section.num_heads,
                                        section.mlp_ratio, section.dropout)
        self.positions = PatchPositions(self.grid, self.dim, mode)
        # layer4 is not part of P: it never runs, so it stays at its init for fine-tuning;
        # frozen so that optimizers and DDP see only what the loss reaches.
        self.encoder.layer4.requires_grad_(False)

    @classmethod
    def from_config(cls, encoder: nn.Module, section: SelfieConfig, model, data) -> Selfie:
        """The module ``section`` describes around ``encoder`` (a ResNet); the grid comes from
        the data's image size, the lr scales with its batch."""
        return cls(_check_resnet(encoder, getattr(model, "backbone", None)), section,
                   image_size=data.image_size, batch_size=data.batch_size)

    @classmethod
    def train_transform(cls, section: SelfieConfig, data) -> SelfieTransform:
        """Sec. 2.1: 4 px zero pad + random crop at 32 px (``crop`` "pad", what "auto" picks up
        to 32 px); RandomResizedCrop on larger images ("resized", assumed); a horizontal flip
        either way (assumed)."""
        crop = section.crop
        if crop == "auto":
            crop = "pad" if data.image_size <= 32 else "resized"
        return SelfieTransform(data.image_size, data.in_chans, data.mean, data.std, crop,
                               section.crop_padding)

    # -- model ---------------------------------------------------------------------------------
    def forward(self, imgs: torch.Tensor, masked: torch.Tensor,
                context: torch.Tensor) -> torch.Tensor:
        """The loss of ``imgs`` (B, C, H, W) with the given masked / context location indices
        (B, k) / (B, L - k)."""
        b = imgs.shape[0]
        patches = extract_patches(imgs, self.patch_size)
        h = patch_features(self.encoder, patches.flatten(0, 1)).reshape(b, self.num_patches, -1)
        masked, context = masked.to(h.device), context.to(h.device)
        ctx = _gather(h, context)
        if self.section.context_pos_embed:
            ctx = ctx + self.positions(context)
        u = self.pooling(ctx)
        return selfie_loss(u, self.positions(masked), _gather(h, masked))

    def pretrain_loss(self, batch, generator_seed: int | None = None) -> torch.Tensor:
        imgs = batch["image"] if isinstance(batch, Mapping) else batch
        if isinstance(imgs, (list, tuple)):
            imgs = imgs[0]
        if imgs.shape[-1] != self.image_size or imgs.shape[-2] != self.image_size:
            raise ValueError(f"Selfie was built for {self.image_size} px images, got "
                             f"{tuple(imgs.shape[-2:])}")
        gen = None if generator_seed is None else torch.Generator().manual_seed(generator_seed)
        masked, context = sample_masks(imgs.shape[0], self.num_patches, self.num_masked, gen)
        return self(imgs, masked, context)

    # -- optimizer -----------------------------------------------------------------------------
    def optimizer_groups(self) -> list[dict]:
        skip = {"pooling.u0", "positions.table", "positions.rows", "positions.cols"}
        return weight_decay_groups(self, self.weight_decay, skip=skip)

    def make_optimizer(self, groups: list[dict], lr: float) -> torch.optim.Optimizer:
        s = self.section
        if s.optimizer == "adamw":
            return torch.optim.AdamW(groups, lr=lr, betas=self.betas)
        return torch.optim.SGD(groups, lr=lr, momentum=s.momentum, nesterov=s.nesterov)


# -- transform ---------------------------------------------------------------------------------


class SelfieTransform:
    """A reader sample ``{"image": PIL image, ...}`` -> ``{"image": (in_chans, S, S)}``
    normalized. ``crop="pad"``: resize + centre crop to S when the image is not S x S, zero
    pad ``padding`` px, random S crop, flip; ``"resized"``: RandomResizedCrop(S), flip."""

    def __init__(self, image_size: int, in_chans: int, mean: Sequence[float],
                 std: Sequence[float], crop: Literal["pad", "resized"] = "pad",
                 padding: int = 4) -> None:
        from torchvision import transforms as T

        self.image_size, self.in_chans = image_size, in_chans
        if crop == "pad":
            spatial = [T.Resize(image_size), T.CenterCrop(image_size),
                       T.RandomCrop(image_size, padding=padding, fill=0)]
        elif crop == "resized":
            spatial = [T.RandomResizedCrop(image_size)]
        else:
            raise ConfigError(f"pretrain.crop: {crop!r} (expected auto, pad or resized)")
        self.to_channels = ToChannels(1 if in_chans == 1 else 3)
        self.ops = T.Compose([*spatial, T.RandomHorizontalFlip(), T.ToTensor(),
                              AdaptChannels(in_chans)])
        self.normalize = T.Normalize(per_channel(mean, in_chans, "mean"),
                                     per_channel(std, in_chans, "std"))

    def __call__(self, sample) -> dict:
        img = sample["image"] if isinstance(sample, Mapping) else sample
        return {"image": self.normalize(self.ops(self.to_channels(img)))}


# -- fine-tuning -------------------------------------------------------------------------------


def finetune_backbone(
    state: Mapping[str, torch.Tensor] | str | Path,
    name: str = "resnet50",
    *,
    norm: str = "batchnorm",
    norm_options: dict | None = None,
    fresh_last_stage: bool = False,
    **kwargs,
) -> ResNet:
    """The fine-tune ResNet of a Selfie-pretrained encoder (Sec. 2, fine-tuning): a headless
    ``create_backbone(name, norm=norm)`` whose stem + ``layer1``..``layer3`` are P's weights.

    ``state`` is the saved encoder (a state dict or a weights file, keys as the ResNet's) or a
    whole Selfie module's state (``encoder.*`` keys taken, the pooling's left out). Since
    Selfie's encoder already is that ResNet, every key loads as is: ``layer4`` gets the
    pretraining run's initial weights, which P's training never touched. With
    ``fresh_last_stage`` it keeps this call's own fresh initialisation instead. Raises
    ``WeightsError`` when a key of P is missing or a shape differs.
    """
    if isinstance(state, (str, Path)):
        state = read_state_dict(state)
    if any(k.startswith("encoder.") for k in state):
        state = {k.removeprefix("encoder."): v for k, v in state.items()
                 if k.startswith("encoder.")}
    backbone = create_backbone(name, norm=norm, norm_options=norm_options, **kwargs)
    own = backbone.state_dict()
    wanted = {k for k in own if not (fresh_last_stage and k.startswith("layer4."))}
    missing = sorted(wanted - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise WeightsError(f"Selfie encoder state does not match {name}: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    for key in wanted:
        if tuple(state[key].shape) != tuple(own[key].shape):
            raise WeightsError(f"Selfie encoder state: {key} has shape "
                               f"{tuple(state[key].shape)}, {name} expects {tuple(own[key].shape)}")
    backbone.load_state_dict({k: state[k] for k in wanted}, strict=not fresh_last_stage)
    return backbone


__all__ = [
    "AttentionPooling",
    "PatchPositions",
    "Selfie",
    "SelfieConfig",
    "SelfieTransform",
    "extract_patches",
    "finetune_backbone",
    "patch_features",
    "sample_masks",
    "selfie_logits",
    "selfie_loss",
]
