"""VideoMAE V2: "VideoMAE V2: Scaling Video Masked Autoencoders with Dual Masking" (Wang et
al., CVPR 2023, arXiv 2303.16727).

Follows OpenGVLab/VideoMAEv2:

- ``models/modeling_pretrain.py`` (``PretrainVisionTransformer``): the encoder (the video ViT
  of ``backbones/video_vit.py``) sees only the tokens the tube mask leaves visible; their
  normed features go through ``encoder_to_decoder`` (Linear, no bias); the decoder reads
  ``[visible + pos, mask_token + pos of every token it reconstructs]`` (the positions of the
  fixed sinusoid table gathered by the two masks, visible tokens first, each group in index
  order) through ``decoder_depth`` blocks, then ``norm`` and ``head`` on the mask-token
  outputs only (``x[:, -return_token_num:]``), a Linear to ``tubelet x p x p x 3`` values.
  Decoder width / heads are the official ``pretrain_videomae_*`` entries (S 192 / 3, B 384 / 6,
  L / H / g 512 / 8), its depth the scripts' ``--decoder_depth 4``.
- ``dataset/masking_generator.py``: ``TubeMaskingGenerator`` (``int(ratio * h * w)`` masked
  positions of one frame, shuffled, tiled over all ``t`` temporal slices) and
  ``RunningCellMaskingGenerator`` (a 2 x 2 cell of ``int(4 * ratio)`` masked slots whose
  queue pointer advances one slot per temporal slice, tiled over the frame; one of its four
  starting phases drawn per clip). Mask value True = masked (the encoder drops it; for the
  decoder mask: not reconstructed).
- ``engine_for_pretraining.py`` (``train_one_epoch``): the target is the de-normalized clip
  (``x * std + mean``, in [0, 1]) as ``b c (t p0) (h p1) (w p2) -> b (t h w) (p0 p1 p2) c``,
  normalized per patch and channel over the ``p0 p1 p2`` values with the UNBIASED std
  (``var(unbiased=True).sqrt() + 1e-6``; MAE divides by ``sqrt(var + 1e-6)``), flattened
  ``(p c)``; the labels are the targets of the decoder-visible tokens, and the MSE (mean over
  the values of a token) is averaged over the decoder-visible tokens the ENCODER MASKED
  (``cal_loss_mask = bool_masked_pos[~decode_masked_pos]``).
- ``dataset/pretrain_datasets.py`` (``DataAugmentationForVideoMAEv2``, ``HybridVideoMAE``
  with ``num_sample``): ``GroupMultiScaleCrop(input_size, [1, .875, .75, .66])`` (a crop of
  side ``scale x short side`` from pairs of scales at most one apart, at one of 13 fixed
  offsets, resized bilinearly), ImageNet mean / std, no flip; repeated augmentation:
  ``num_sample`` crops (each with its own masks) of the same sampled frames.
- ``run_mae_pretraining.py`` and ``scripts/pretrain/vit_b_hybrid_pt.sh``: AdamW (0.9, 0.95),
  weight decay 0.05 (not on biases, norms and the mask token), lr = ``--lr`` 1e-3 x videos per
  step / 256 (the videos, not the ``num_sample`` x more clips), min lr 1e-5 x videos / 256,
  20 warmup epochs of 200 (over UnlabeledHybrid with ``num_sample`` 4: "800 epochs" of
  clips), mask ratios 0.9 / 0.5, 16 frames at stride 4.

Deviations: the schedule is MAE's per-step warmup + half-cycle cosine from the fractional
epoch (the official ``cosine_scheduler`` is the same curve as an array of per-step values,
its warmup a ``linspace`` that ends one step later); masks are drawn in the module from a
torch generator of each rank (seeded by the run's seed and the rank, restarted on resume)
instead of numpy's in each data-loader worker (same distributions). ``clip_grad`` is the
scripts' ``--clip_grad`` (``vit_g_hybrid_pt.sh``: 0.02; the others: none), the total gradient
norm clipped before each step (``NativeScalerWithGradNormCount``: ``clip_grad_norm_`` after
unscaling), through Lightning's ``clip_gradients``.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from timm.models.eva import EvaBlock
from torch import Tensor, nn

from visionbench.backbones.video_vit import (
    VideoViT,
    init_linear_and_norm_,
    sinusoid_table,
    visible_tokens,
)
from visionbench.backbones.weights import load_exactly, read_state_dict
from visionbench.data.batch import unpack
from visionbench.data.video.datamodule import VideoMAEPretrainTransform
from visionbench.errors import ConfigError
from visionbench.methods.base import PretrainModule
from visionbench.methods.registry import register_method
from visionbench.methods.schedule import absolute_lr, weight_decay_groups
from visionbench.norms import norm_layer
from visionbench.schema import LocalFile, MethodConfig

DECODER_SIDE = ("decoder.", "encoder_to_decoder.", "mask_token")
# decoder (width, heads) of the official pretrain_videomae_<size>_patch*_224 entries
DECODER_SIZES = {192: (96, 3),  # no official tiny: half the width, as the others
                 384: (192, 3), 768: (384, 6), 1024: (512, 8),
                 1280: (512, 8), 1408: (512, 8)}


class VideoMAEv2Config(MethodConfig):
    """VideoMAE V2 pretraining (``scripts/pretrain/vit_b_hybrid_pt.sh``)."""

    method: Literal["videomae_v2"] = "videomae_v2"
    epochs: int = Field(200, gt=0)
    warmup_epochs: float = Field(20, ge=0)
    blr: float = Field(1e-3, gt=0)
    min_blr: float = Field(1e-5, ge=0)  # min lr = min_blr x videos per step / 256
    mask_ratio: float = Field(0.9, gt=0, lt=1)  # the encoder's tube mask
    decoder_mask_ratio: float = Field(0.5, ge=0, lt=1)  # running cell; 0: no decoder mask
    normalize_target: bool = True
    decoder_depth: int = Field(4, gt=0)
    decoder_embed_dim: int | None = Field(None, gt=0)  # None: the official width of the size
    decoder_num_heads: int | None = Field(None, gt=0)
    num_sample: int = Field(4, gt=0)  # repeated augmentation: crops of each sampled clip
    clip_grad: float | None = Field(None, gt=0)  # max gradient norm; ViT-g: 0.02
    official_weights: LocalFile = None
    figure_clips: int = Field(2, gt=0)

    @model_validator(mode="after")
    def _min_lr_is_min_blr(self):
        if self.min_lr:
            raise ValueError("min_lr: VideoMAE V2 scales its minimum lr with the batch; set "
                             "min_blr (min lr = min_blr x batch / 256) instead")
        return self


# ----------------------------------------------------------------------------- masks


def tube_mask(batch: int, grid: tuple[int, int, int], ratio: float,
              generator: torch.Generator | None = None) -> Tensor:
    """``TubeMaskingGenerator``: (batch, t * h * w) bool, ``int(ratio * h * w)`` positions of
    one frame masked (True), the same in every temporal slice."""
    t, h, w = grid
    per_frame = h * w
    count = int(ratio * per_frame)
    order = torch.rand(batch, per_frame, generator=generator).argsort(dim=1)
    frame = torch.zeros(batch, per_frame, dtype=torch.bool)
    frame.scatter_(1, order[:, :count], True)
    return frame.repeat(1, t)


def running_cell_patterns(grid: tuple[int, int, int], ratio: float = 0.5) -> Tensor:
    """Every mask of ``RunningCellMaskingGenerator``: (4, t * h * w) bool, one per starting
    phase of the cell's queue (``int(4 * ratio)`` masked slots then the visible ones; the
    pointer starts at the phase and advances once before each temporal slice)."""
    t, h, w = grid
    masked = int(4 * ratio)
    if not 0 < masked < 4:
        raise ConfigError(f"decoder_mask_ratio {ratio}: the running cell masks 1 to 3 of its "
                          "4 slots (ratio 0.25 to 0.99)")
    if h % 2 or w % 2:
        raise ConfigError(f"running-cell masking tiles 2 x 2 cells; the token grid {h} x {w} "
                          "must be even")
    queue = torch.tensor([True] * masked + [False] * (4 - masked))
    patterns = []
    for phase in range(4):
        pointer, frames = phase, []
        for _ in range(t):
            pointer += 1
            cell = queue[(torch.arange(4) + pointer) % 4].reshape(2, 2)
            frames.append(cell.repeat(h // 2, w // 2).flatten())
        patterns.append(torch.stack(frames).flatten())
    return torch.stack(patterns)


# ----------------------------------------------------------------------------- targets


def clip_patches(video: Tensor, tubelet: int, patch: int) -> Tensor:
    """``b c (t p0) (h p1) (w p2) -> b (t h w) (p0 p1 p2) c``."""
    b, c, t, h, w = video.shape
    x = video.reshape(b, c, t // tubelet, tubelet, h // patch, patch, w // patch, patch)
    x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)
    return x.reshape(b, (t // tubelet) * (h // patch) * (w // patch),
                     tubelet * patch * patch, c)


def reconstruction_target(video01: Tensor, tubelet: int, patch: int,
                          normalize: bool = True) -> Tensor:
    """The official labels of every token, (B, N, tubelet * p * p * C): per patch and channel
    ``(x - mean) / (unbiased std + 1e-6)`` of the clip in [0, 1] (or the raw values)."""
    patches = clip_patches(video01, tubelet, patch)
    if normalize:
        mean = patches.mean(dim=-2, keepdim=True)
        std = patches.var(dim=-2, unbiased=True, keepdim=True).sqrt()
        patches = (patches - mean) / (std + 1e-6)
    return patches.flatten(2)


def dual_masked_loss(pred: Tensor, target: Tensor, mask: Tensor, decode_mask: Tensor) -> Tensor:
    """MSE over the decoder-visible tokens the encoder masked. ``pred``: (B, N_dec, V) for the
    decoder-visible tokens in index order; ``target``: (B, N, V) of every token."""
    b = target.shape[0]
    labels = target[~decode_mask].reshape(b, -1, target.shape[-1])
    loss = ((pred - labels) ** 2).mean(dim=-1)
    counted = mask[~decode_mask].reshape(b, -1).to(loss.dtype)
    return (loss * counted).sum() / counted.sum()


# ----------------------------------------------------------------------------- transform


class VideoMAEv2Transform:
    """The pretraining transform: ``num_sample`` draws of ``DataAugmentationForVideoMAEv2``
    (``VideoMAEPretrainTransform``: a multi-scale crop at a fixed offset, resized, normalized)
    of the sampled frames (uint8 ``(T, H, W, 3)``): ``{"video": (num_sample, 3, T, size,
    size)}``, the official repeated augmentation."""

    def __init__(self, size: int, mean, std, num_sample: int = 1) -> None:
        self.crop = VideoMAEPretrainTransform(size, mean, std)
        self.num_sample = num_sample

    def __call__(self, sample: dict) -> dict:
        clips = torch.stack([self.crop(sample)["video"] for _ in range(self.num_sample)])
        return {**sample, "video": clips}


# ----------------------------------------------------------------------------- model


class VideoMAEDecoder(nn.Module):
    """``PretrainVisionTransformerDecoder``: blocks, norm, head on the last tokens."""

    def __init__(self, embed_dim: int, depth: int, num_heads: int, out_dim: int,
                 make_norm) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            EvaBlock(embed_dim, num_heads, qkv_bias=True, qkv_fused=True, mlp_ratio=4.0,
                     num_prefix_tokens=0, norm_layer=make_norm) for _ in range(depth))
        self.norm = make_norm(embed_dim)
        self.head = nn.Linear(embed_dim, out_dim)

    def forward(self, x: Tensor, return_token_num: int) -> Tensor:
        for block in self.blocks:
            x = block(x)
        if return_token_num > 0:
            x = x[:, -return_token_num:]
        return self.head(self.norm(x))


@register_method
class VideoMAEv2(PretrainModule):
    """Dual-masking video masked autoencoder around a ``VideoViT`` encoder."""

    config = VideoMAEv2Config
    families = ("video_vit",)

    def __init__(self, encoder: VideoViT, schedule: VideoMAEv2Config | None = None, *,
                 decoder_embed_dim: int | None = None, decoder_depth: int = 4,
                 decoder_num_heads: int | None = None, norm: str = "layernorm",
                 norm_options: dict | None = None, mask_ratio: float = 0.9,
                 decoder_mask_ratio: float = 0.5, normalize_target: bool = True,
                 mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                 batch_size: int = 32) -> None:
        schedule = schedule or VideoMAEv2Config()
        super().__init__(schedule, batch_size=batch_size, betas=(0.9, 0.95))
        self.min_blr = schedule.min_blr
        self.encoder = encoder
        self.mask_ratio, self.decoder_mask_ratio = mask_ratio, decoder_mask_ratio
        self.normalize_target = normalize_target
        self.clip_grad = schedule.clip_grad
        self.grid = encoder.grid_size
        self.patch = encoder.patch_embed.patch_size
        self.tubelet = encoder.patch_embed.tubelet_size
        self.in_chans = encoder.patch_embed.proj.in_channels
        official = DECODER_SIZES.get(encoder.embed_dim, (encoder.embed_dim // 2, 8))
        width = decoder_embed_dim or official[0]
        heads = decoder_num_heads or official[1]
        make_norm = norm_layer(norm, kind="token", options=norm_options)
        out_dim = self.in_chans * self.tubelet * self.patch ** 2
        self.encoder_to_decoder = nn.Linear(encoder.embed_dim, width, bias=False)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.decoder = VideoMAEDecoder(width, decoder_depth, heads, out_dim, make_norm)
        self.register_buffer("decoder_pos_embed",
                             sinusoid_table(encoder.patch_embed.num_patches, width),
                             persistent=False)
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1, 1), persistent=False)
        self.register_buffer("cell_patterns", running_cell_patterns(self.grid,
                                                                    decoder_mask_ratio)
                             if decoder_mask_ratio > 0 else torch.zeros(0), persistent=False)
        self.decoder.apply(init_linear_and_norm_)  # encoder_to_decoder keeps torch's init
        nn.init.trunc_normal_(self.mask_token, std=0.02, a=-0.02, b=0.02)

    @classmethod
    def from_config(cls, encoder: nn.Module, section: VideoMAEv2Config, model,
                    data) -> VideoMAEv2:
        if not isinstance(encoder, VideoViT):
            raise ConfigError(f"model.backbone: VideoMAE V2 pretrains video ViTs (family "
                              f"{', '.join(cls.families)}), not {model.backbone}")
        if encoder.patch_embed.num_frames != data.video.num_frames:
            raise ConfigError(f"data.video.num_frames {data.video.num_frames} differs from "
                              f"the backbone's num_frames {encoder.patch_embed.num_frames} "
                              "(model.backbone_kwargs.num_frames)")
        return cls(encoder, section, decoder_embed_dim=section.decoder_embed_dim,
                   decoder_depth=section.decoder_depth,
                   decoder_num_heads=section.decoder_num_heads, norm=model.norm,
                   norm_options=model.norm_options.get(model.norm),
                   mask_ratio=section.mask_ratio,
                   decoder_mask_ratio=section.decoder_mask_ratio,
                   normalize_target=section.normalize_target, mean=data.mean, std=data.std,
                   batch_size=data.batch_size)

    @classmethod
    def train_transform(cls, section: VideoMAEv2Config, data):
        return VideoMAEv2Transform(data.image_size, data.mean, data.std, section.num_sample)

    def optimizer_groups(self) -> list[dict]:
        """``optim_factory.get_parameter_groups``: no decay on 1-D parameters, biases and
        the model's ``no_weight_decay`` names (the mask token)."""
        return weight_decay_groups(self, self.weight_decay, skip={"mask_token"})

    def configure_optimizers(self):
        optimizer = super().configure_optimizers()
        trainer = self.trainer
        self.min_lr = absolute_lr(self.min_blr, self.batch_size,
                                  trainer.accumulate_grad_batches, trainer.world_size)
        return optimizer

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None,
                                    gradient_clip_algorithm=None) -> None:
        """``clip_grad``, else the trainer's ``gradient_clip_val``."""
        if self.clip_grad is not None:
            gradient_clip_val, gradient_clip_algorithm = self.clip_grad, "norm"
        self.clip_gradients(optimizer, gradient_clip_val=gradient_clip_val,
                            gradient_clip_algorithm=gradient_clip_algorithm)

    # -- masks -------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        # every rank draws its own masks (the official seeds each rank with seed + rank);
        # the global generator is seeded alike on every rank
        self.mask_generator = torch.Generator().manual_seed(
            int(torch.initial_seed()) % 2**31 + 7919 * self.global_rank)

    def masks(self, batch: int, generator: torch.Generator | None = None
              ) -> tuple[Tensor, Tensor]:
        """(encoder tube mask, decoder mask) for ``batch`` clips, True = masked; without
        decoder masking the decoder reconstructs exactly the encoder-masked tokens. Drawn
        from ``generator``, else during a fit from this rank's own generator."""
        generator = generator or getattr(self, "mask_generator", None)
        mask = tube_mask(batch, self.grid, self.mask_ratio, generator)
        if self.decoder_mask_ratio > 0:
            phase = torch.randint(0, 4, (batch,), generator=generator)
            decode_mask = self.cell_patterns.cpu()[phase]
        else:
            decode_mask = ~mask
        return mask.to(self.device), decode_mask.to(self.device)

    # -- model -------------------------------------------------------------------------------
    def forward(self, video: Tensor, mask: Tensor, decode_mask: Tensor) -> Tensor:
        """Predictions (B, N_decoded, tubelet * p * p * C) of the decoder-visible tokens."""
        x_vis = self.encoder_to_decoder(self.encoder.forward_features(video, mask))
        b = x_vis.shape[0]
        pos = self.decoder_pos_embed.to(x_vis.dtype).expand(b, -1, -1)
        pos_vis = visible_tokens(pos, mask)
        pos_dec = visible_tokens(pos, decode_mask)
        x_full = torch.cat([x_vis + pos_vis, self.mask_token + pos_dec], dim=1)
        return self.decoder(x_full, pos_dec.shape[1])

    def target(self, video: Tensor) -> Tensor:
        with torch.no_grad():
            video01 = video.float() * self.std + self.mean
            return reconstruction_target(video01, self.tubelet, self.patch,
                                         self.normalize_target)

    def loss(self, video: Tensor, mask: Tensor, decode_mask: Tensor) -> Tensor:
        pred = self(video, mask, decode_mask)
        return dual_masked_loss(pred.float(), self.target(video), mask, decode_mask)

    def pretrain_loss(self, batch, generator_seed: int | None = None) -> Tensor:
        video = batch if torch.is_tensor(batch) else unpack(batch, "video")
        if video.ndim == 6:  # repeated augmentation: (B, num_sample, C, T, H, W)
            video = video.flatten(0, 1)
        gen = None if generator_seed is None else torch.Generator().manual_seed(generator_seed)
        mask, decode_mask = self.masks(video.shape[0], gen)
        return self.loss(video, mask, decode_mask)

    # -- reconstruction for figures -------------------------------------------------------------
    @torch.no_grad()
    def reconstruct(self, video: Tensor, generator: torch.Generator | None = None
                    ) -> tuple[Tensor, Tensor, Tensor]:
        """(clip in [0, 1], tube mask, reconstruction in [0, 1]) with every token decoded
        (no decoder mask), the visible tokens pasted in; (B, C, T, H, W) and (B, N)."""
        mask = tube_mask(video.shape[0], self.grid, self.mask_ratio, generator).to(video.device)
        everything = torch.zeros_like(mask)
        pred = self(video, mask, everything).float()
        video01 = video.float() * self.std + self.mean
        patches = clip_patches(video01, self.tubelet, self.patch)
        if self.normalize_target:
            mean = patches.mean(dim=-2, keepdim=True)
            std = patches.var(dim=-2, unbiased=True, keepdim=True).sqrt()
            pred = pred.reshape(patches.shape) * (std + 1e-6) + mean
        pred = pred.reshape(patches.shape)
        pasted = torch.where(mask[..., None, None], pred, patches)
        return video01, mask, unpatch_clip(pasted.clamp(0, 1), video.shape, self.tubelet,
                                           self.patch)

    # -- official checkpoints -------------------------------------------------------------------
    def load_official(self, path: str) -> str:
        """An official pretraining checkpoint (``checkpoint["model"]`` of
        ``run_mae_pretraining.py``): its keys are this module's (``encoder.*``,
        ``decoder.*``, ``encoder_to_decoder.weight``, ``mask_token``; the sinusoid tables
        are not stored), so the documented mapping is the identity (the ``module.`` prefix of
        a DDP save and the ``_orig_mod.`` of a compiled model dropped), checked strictly."""
        state = {key if key.startswith(DECODER_SIDE) else f"encoder.{key}": value
                 for key, value in read_state_dict(path).items()}  # it strips "encoder."
        load_exactly(self, state, path, f"keys of VideoMAE V2 ({self.encoder.embed_dim}d)")
        return f"loaded official VideoMAE V2 checkpoint {path} ({len(state)} tensors)"


def unpatch_clip(patches: Tensor, shape, tubelet: int, patch: int) -> Tensor:
    """The inverse of ``clip_patches``: (B, N, t p p, C) -> (B, C, T, H, W)."""
    b, c, t, h, w = shape
    x = patches.reshape(b, t // tubelet, h // patch, w // patch, tubelet, patch, patch, c)
    return x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(b, c, t, h, w)
