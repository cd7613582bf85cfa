"""MAE: "Masked Autoencoders Are Scalable Vision Learners" (He et al., CVPR 2022, arXiv 2111.06377).

Follows facebookresearch/mae ``models_mae.py`` (model, masking, loss, init),
``main_pretrain.py`` (AdamW betas (0.9, 0.95), weight decay 0.05 except biases and 1-D
parameters, lr = blr * batch / 256), ``util/lr_sched.py`` (per-step warmup, half-cycle cosine)
and ``util/pos_embed.py`` (fixed 2-D sin-cos embeddings).

The encoder is a headless timm ``VisionTransformer`` whose parameter names equal the official
encoder's, so an official checkpoint maps onto ``encoder.*`` + the decoder keys unchanged, and
the pretrained encoder is the backbone every protocol evaluates.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from visionbench.backbones.pos_embed import fixed_sincos_
from visionbench.backbones.vit import init_linear_and_norm_
from visionbench.backbones.weights import read_state_dict, split_mae_state
from visionbench.data.batch import unpack
from visionbench.errors import ConfigError, WeightsError
from visionbench.methods.base import PretrainModule
from visionbench.methods.registry import register_method
from visionbench.norms import norm_layer
from visionbench.schema import LocalFile, MethodConfig


class MAEConfig(MethodConfig):
    """MAE pretraining (``main_pretrain.py`` / PRETRAIN.md: ViT-B 800 epochs, 40 warmup, blr
    1.5e-4, weight decay 0.05, mask ratio 0.75, normalized pixel loss, decoder 512 x 8 x 16)."""

    method: Literal["mae"] = "mae"
    epochs: int = Field(800, gt=0)
    warmup_epochs: float = Field(40, ge=0)
    blr: float = Field(1.5e-4, gt=0)
    mask_ratio: float = Field(0.75, ge=0, lt=1)
    norm_pix_loss: bool = True
    decoder_embed_dim: int = Field(512, gt=0)
    decoder_depth: int = Field(8, gt=0)
    decoder_num_heads: int = Field(16, gt=0)
    official_weights: LocalFile = None
    figure_images: int = Field(8, gt=0)


def patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, L, p*p*C), channels last inside a patch, as ``models_mae.patchify``."""
    n, c, h, w = imgs.shape
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {p}")
    x = imgs.reshape(n, c, h // p, p, w // p, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(n, (h // p) * (w // p), p * p * c)


def unpatchify(x: torch.Tensor, p: int, grid: tuple[int, int], c: int) -> torch.Tensor:
    """(N, L, p*p*C) -> (N, C, H, W), the inverse of ``patchify``."""
    h, w = grid
    x = x.reshape(x.shape[0], h, w, p, p, c)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(x.shape[0], c, h * p, w * p)


def random_masking(
    x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample random masking by argsort of noise; keeps exactly int(L * (1 - ratio)) tokens.

    Returns (kept tokens (N, len_keep, D), mask (N, L) with 1 = removed, ids_restore (N, L)).
    """
    n, length, dim = x.shape
    len_keep = int(length * (1 - mask_ratio))
    if noise is None:
        noise = torch.rand(n, length, device=x.device)
    elif noise.shape != (n, length):
        raise ValueError(f"noise must have shape {(n, length)}, got {tuple(noise.shape)}")
    ids_shuffle = torch.argsort(noise, dim=1)  # ascending: small noise is kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    kept = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, dim))
    mask = torch.ones(n, length, device=x.device, dtype=x.dtype)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return kept, mask, ids_restore


def masked_patch_loss(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix_loss: bool
) -> torch.Tensor:
    """Per-patch MSE averaged over the masked patches only (``models_mae.forward_loss``)."""
    if norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    loss = ((pred - target) ** 2).mean(dim=-1)
    return (loss * mask).sum() / mask.sum()


@register_method
class MAE(PretrainModule):
    """Masked autoencoder around a timm ViT encoder (``num_classes=0``)."""

    config = MAEConfig
    families = ("vit",)

    def __init__(
        self,
        encoder: VisionTransformer,
        schedule: MAEConfig | None = None,
        *,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0,
        norm: str = "layernorm",
        norm_options: dict | None = None,
        mask_ratio: float = 0.75,
        norm_pix_loss: bool = True,
        batch_size: int = 64,
    ) -> None:
        super().__init__(schedule or MAEConfig(), batch_size=batch_size, betas=(0.9, 0.95))
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        self.encoder = encoder
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        self.patch_size = int(encoder.patch_embed.patch_size[0])
        self.grid = tuple(encoder.patch_embed.grid_size)
        self.in_chans = int(encoder.patch_embed.proj.in_channels)
        num_patches = self.grid[0] * self.grid[1]
        embed_dim = encoder.embed_dim

        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(
            torch.zeros(1, num_patches + 1, decoder_embed_dim), requires_grad=False
        )
        make_norm = norm_layer(norm, kind="token", options=norm_options,
                               context={"num_heads": decoder_num_heads})
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True,
                  norm_layer=make_norm)
            for _ in range(decoder_depth)
        )
        self.decoder_norm = make_norm(decoder_embed_dim)
        self.decoder_pred = nn.Linear(
            decoder_embed_dim, self.patch_size**2 * self.in_chans, bias=True
        )
        self._init_decoder()

    def _init_decoder(self) -> None:
        fixed_sincos_(self.decoder_pos_embed, self.grid, num_prefix=1)
        nn.init.normal_(self.mask_token, std=0.02)
        for name, module in self.named_modules():
            if not name.startswith("encoder"):
                init_linear_and_norm_(module)

    @classmethod
    def from_config(cls, encoder: nn.Module, section: MAEConfig, model, data) -> MAE:
        """The module ``section`` describes around ``encoder`` (the decoder takes the model's
        norm; the lr scales with the data's batch)."""
        if not isinstance(encoder, VisionTransformer):
            raise ConfigError(f"model.backbone: MAE pretrains ViT backbones (families: "
                              f"{', '.join(cls.families)}), not {model.backbone}")
        return cls(
            encoder,
            section,
            decoder_embed_dim=section.decoder_embed_dim,
            decoder_depth=section.decoder_depth,
            decoder_num_heads=section.decoder_num_heads,
            norm=model.norm,
            norm_options=model.norm_options.get(model.norm),
            mask_ratio=section.mask_ratio,
            norm_pix_loss=section.norm_pix_loss,
            batch_size=data.batch_size,
        )

    @classmethod
    def train_transform(cls, section: MAEConfig, data):
        """``main_pretrain.py``: RandomResizedCrop(scale 0.2-1, bicubic), flip, normalize."""
        from visionbench.data.transforms import mae_pretrain_transform

        return mae_pretrain_transform(data)

    # -- model ------------------------------------------------------------------------------
    def forward_encoder(
        self, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        enc = self.encoder
        x = enc.patch_embed(imgs)
        x = x + enc.pos_embed[:, enc.num_prefix_tokens :, :]
        x, mask, ids_restore = random_masking(x, mask_ratio, noise)
        cls = enc.cls_token + enc.pos_embed[:, :1, :]
        x = torch.cat([cls.expand(x.shape[0], -1, -1), x], dim=1)
        x = enc.norm_pre(x)
        x = enc.blocks(x)
        x = enc.norm(x)
        return x, mask, ids_restore

    def forward_decoder(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.decoder_embed(x)
        n, length = ids_restore.shape
        mask_tokens = self.mask_token.expand(n, length + 1 - x.shape[1], -1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        x = torch.cat([x[:, :1, :], x_], dim=1)
        x = x + self.decoder_pos_embed
        for block in self.decoder_blocks:
            x = block(x)
        x = self.decoder_norm(x)
        x = self.decoder_pred(x)
        return x[:, 1:, :]

    def forward(
        self,
        imgs: torch.Tensor,
        mask_ratio: float | None = None,
        noise: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, pred (N, L, p*p*C), mask (N, L)), as ``MaskedAutoencoderViT.forward``."""
        ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        latent, mask, ids_restore = self.forward_encoder(imgs, ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        target = patchify(imgs, self.patch_size)
        loss = masked_patch_loss(pred, target, mask, self.norm_pix_loss)
        return loss, pred, mask

    def pretrain_loss(self, batch, generator_seed: int | None = None) -> torch.Tensor:
        imgs = batch if torch.is_tensor(batch) else unpack(batch, "image")
        noise = None
        if generator_seed is not None:  # a fixed masking per validation batch
            gen = torch.Generator().manual_seed(generator_seed)
            noise = torch.rand(imgs.shape[0], self.grid[0] * self.grid[1], generator=gen)
            noise = noise.to(imgs.device)
        loss, _, _ = self(imgs, noise=noise)
        return loss

    # -- reconstruction for figures -----------------------------------------------------------
    @torch.no_grad()
    def reconstruct(
        self, imgs: torch.Tensor, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(masked input, reconstruction pasted with the visible patches), both as images.

        With ``norm_pix_loss`` the prediction is per-patch normalized; it is mapped back with
        each target patch's own mean and variance so the figure is in image space.
        """
        _, pred, mask = self(imgs, noise=noise)
        target = patchify(imgs, self.patch_size)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            pred = pred * (var + 1.0e-6) ** 0.5 + mean
        m = mask.unsqueeze(-1)
        masked = unpatchify(target * (1 - m), self.patch_size, self.grid, self.in_chans)
        pasted = unpatchify(target * (1 - m) + pred * m, self.patch_size, self.grid, self.in_chans)
        return masked, pasted

    # -- official checkpoints -------------------------------------------------------------------
    def load_official(self, path: str) -> str:
        """Load an official MAE checkpoint (full model with decoder, or encoder only).

        The documented mapping: official encoder keys -> ``encoder.<same key>``; decoder keys
        (``mask_token``, ``decoder_*``) unchanged. Keys must match exactly (strict); an
        encoder-only checkpoint leaves the decoder at its initialisation.
        """
        state = read_state_dict(path)
        encoder, decoder, aside = split_mae_state(state)
        if aside:
            raise WeightsError(
                f"{path}: has classifier keys ({', '.join(aside[:4])}); this is a fine-tuned "
                "checkpoint, load it as a backbone with model.weights instead"
            )
        mapped = {f"encoder.{k}": v for k, v in encoder.items()}
        mapped.update(decoder)
        own = self.state_dict()
        expected = set(own) if decoder else {k for k in own if k.startswith("encoder.")}
        missing = sorted(expected - set(mapped))
        unexpected = sorted(set(mapped) - set(own))
        if missing or unexpected:
            raise WeightsError(
                f"{path}: keys do not match MAE({self.encoder.embed_dim}d): "
                f"missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        for key, value in mapped.items():
            if own[key].shape != value.shape:
                raise WeightsError(
                    f"{path}: {key} has shape {tuple(value.shape)}, "
                    f"expected {tuple(own[key].shape)}"
                )
        # The key sets were checked above; an encoder-only file leaves the decoder as it is.
        self.load_state_dict(mapped, strict=bool(decoder))
        kind = "full model" if decoder else "encoder only"
        return f"loaded official MAE checkpoint {path} ({kind}, {len(mapped)} tensors)"
