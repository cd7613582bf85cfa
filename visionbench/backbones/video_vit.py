"""The video Vision Transformer of VideoMAE / VideoMAE V2: a ViT over space-time tubelets.

Follows OpenGVLab/VideoMAEv2 ``models/modeling_finetune.py`` (``PatchEmbed``, ``Attention``,
``Block``, ``get_sinusoid_encoding_table``, ``VisionTransformer``) and the encoder of
``models/modeling_pretrain.py`` (``PretrainVisionTransformerEncoder``):

- tubelet embedding: ``Conv3d`` with kernel = stride = ``(tubelet_size, patch, patch)``, so a
  16 x 224 x 224 clip becomes 8 x 14 x 14 = 1568 tokens, flattened time-major (``t h w``);
- no class token; a fixed 1-D sinusoid table over the flattened token index (the official
  ``get_sinusoid_encoding_table``: ``pos / 10000^(2 (j // 2) / D)``, sin on even channels,
  cos on odd), added to every token and never trained;
- pre-norm blocks whose attention has a fused ``qkv`` projection without bias plus separate
  ``q_bias`` and ``v_bias`` (the key bias is zero), LayerNorm eps 1e-6, GELU MLP of ratio 4,
  optional LayerScale (``init_values``: ``gamma_1`` / ``gamma_2``) and stochastic depth.
  The block is timm's ``EvaBlock`` (BEiT's block, which VideoMAE's is): same computation and
  the official parameter names (``attn.qkv.weight``, ``attn.q_bias``, ``attn.v_bias``,
  ``gamma_1``), so the official checkpoints load by name;
- the final ``norm``; ``forward`` returns the mean of the normed tokens (the official
  fine-tune model's ``use_mean_pooling`` reads ``fc_norm(mean)`` instead: the fine-tune
  protocol puts its own ``fc_norm`` there and drops ``norm``, as the official does).

Initialisation (``init="videomae"``) is the pretraining encoder's ``_init_weights``:
xavier-uniform linears with zero bias, LayerNorm weight 1 / bias 0, the Conv3d left at
PyTorch's default. The norm is chosen by name from the catalog (token kind; LayerNorm by
default) at the official "pre" placement only.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np
import torch
from timm.models.eva import EvaBlock
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from visionbench.errors import ConfigError
from visionbench.norms import norm_layer

VIDEO_VIT_NAME = re.compile(r"^video_vit_(tiny|small|base|large|huge|giant)_patch(\d+)_(\d+)$")

# (embed_dim, depth, num_heads, mlp_ratio) of modeling_pretrain.py / modeling_finetune.py
SIZES = {
    "tiny": (192, 12, 3, 4.0),
    "small": (384, 12, 6, 4.0),
    "base": (768, 12, 12, 4.0),
    "large": (1024, 24, 16, 4.0),
    "huge": (1280, 32, 16, 4.0),
    "giant": (1408, 40, 16, 48 / 11),
}


def is_video_vit_name(name: str) -> bool:
    return bool(VIDEO_VIT_NAME.match(name))


def sinusoid_table(n_position: int, dim: int) -> Tensor:
    """The official ``get_sinusoid_encoding_table``: (1, n_position, dim) float32."""
    positions = np.arange(n_position, dtype=np.float64)[:, None]
    exponents = 2 * (np.arange(dim) // 2) / dim
    table = positions / np.power(10000, exponents)[None, :]
    table[:, 0::2] = np.sin(table[:, 0::2])
    table[:, 1::2] = np.cos(table[:, 1::2])
    return torch.tensor(table, dtype=torch.float32).unsqueeze(0)


class TubeletEmbed(nn.Module):
    """``(B, C, T, H, W)`` -> ``(B, T/t * H/p * W/p, D)`` tokens, time-major."""

    def __init__(self, img_size: int, patch_size: int, num_frames: int, tubelet_size: int,
                 in_chans: int, embed_dim: int) -> None:
        super().__init__()
        if img_size % patch_size or num_frames % tubelet_size:
            raise ConfigError(f"video ViT: img_size {img_size} must be a multiple of "
                              f"patch_size {patch_size} and num_frames {num_frames} of "
                              f"tubelet_size {tubelet_size}")
        self.img_size, self.patch_size = img_size, patch_size
        self.num_frames, self.tubelet_size = num_frames, tubelet_size
        self.grid_size = (num_frames // tubelet_size, img_size // patch_size,
                          img_size // patch_size)
        self.num_patches = int(np.prod(self.grid_size))
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=(tubelet_size, patch_size,
                                                               patch_size),
                              stride=(tubelet_size, patch_size, patch_size))

    def forward(self, x: Tensor) -> Tensor:
        expected = (self.proj.in_channels, self.num_frames, self.img_size, self.img_size)
        if x.ndim != 5 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"video ViT: expected clips (B, {', '.join(map(str, expected))}),"
                             f" got {tuple(x.shape)}")
        return self.proj(x).flatten(2).transpose(1, 2)


class VideoViT(nn.Module):
    """VideoMAE's video ViT encoder (headless). ``forward_features(x, mask)`` returns the
    normed tokens of the visible positions (``mask`` True = masked, the same count in every
    clip), in index order."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, num_frames: int = 16,
                 tubelet_size: int = 2, in_chans: int = 3, embed_dim: int = 768,
                 depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, init_values: float | None = None,
                 drop_path_rate: float = 0.0, norm: Callable[[int], nn.Module] | None = None,
                 grad_checkpointing: bool = False) -> None:
        super().__init__()
        make_norm = norm or norm_layer("layernorm", kind="token")
        self.embed_dim = self.num_features = embed_dim
        self.num_prefix_tokens = 0
        self.grad_checkpointing = grad_checkpointing
        self.patch_embed = TubeletEmbed(img_size, patch_size, num_frames, tubelet_size,
                                        in_chans, embed_dim)
        self.register_buffer("pos_embed", sinusoid_table(self.patch_embed.num_patches,
                                                         embed_dim), persistent=False)
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList([
            EvaBlock(embed_dim, num_heads, qkv_bias=qkv_bias, qkv_fused=True,
                     mlp_ratio=mlp_ratio, num_prefix_tokens=0, drop_path=rate,
                     init_values=init_values or None, norm_layer=make_norm)
            for rate in rates])
        self.norm = make_norm(embed_dim)
        self.placement = "pre"
        self.apply(init_linear_and_norm_)
        for block in self.blocks:
            if block.gamma_1 is not None:
                nn.init.constant_(block.gamma_1, init_values)
                nn.init.constant_(block.gamma_2, init_values)

    @property
    def grid_size(self) -> tuple[int, int, int]:
        return self.patch_embed.grid_size

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"}

    def set_fused_attn(self, fused: bool) -> None:
        """Fused (``scaled_dot_product_attention``) or explicit softmax attention."""
        for block in self.blocks:
            block.attn.fused_attn = fused

    def embed(self, x: Tensor) -> Tensor:
        return self.patch_embed(x) + self.pos_embed.to(x.dtype)

    def forward_features(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        x = self.embed(x)
        if mask is not None:
            x = visible_tokens(x, mask)
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if (
                self.grad_checkpointing and self.training) else block(x)
        return self.norm(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_features(x).mean(dim=1)


def visible_tokens(x: Tensor, mask: Tensor) -> Tensor:
    """``x[~mask]`` per clip, in index order: ``(B, N, D)`` -> ``(B, N_visible, D)``."""
    if mask.shape != x.shape[:2] or mask.dtype != torch.bool:
        raise ValueError(f"mask: expected bool {tuple(x.shape[:2])}, got {mask.dtype} "
                         f"{tuple(mask.shape)}")
    visible = (~mask).sum(dim=1)
    if (visible != visible[0]).any():
        raise ValueError("mask: every clip must mask the same number of tokens")
    return x[~mask].reshape(x.shape[0], -1, x.shape[-1])


def init_linear_and_norm_(module: nn.Module) -> None:
    """The official ``_init_weights`` of the pretraining encoder and decoder."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def create_video_vit(name: str, *, norm: str = "layernorm", placement: str = "pre",
                     norm_options: dict | None = None, init: str = "videomae",
                     **overrides) -> VideoViT:
    """A video ViT of ``name`` (``video_vit_<size>_patch<p>_<img_size>``); ``overrides``
    (``num_frames``, ``tubelet_size``, ``embed_dim``, ``depth``, ``num_heads``, ``img_size``,
    ``patch_size``, ``init_values``, ``drop_path_rate``, ...) replace the size's defaults."""
    match = VIDEO_VIT_NAME.match(name)
    if match is None:
        raise ConfigError(f"unknown video ViT backbone {name!r}; expected a name like "
                          "video_vit_base_patch16_224")
    if placement != "pre":
        raise ConfigError(f"placement {placement!r}: the video ViT has the official 'pre' "
                          "placement only")
    if init != "videomae":
        raise ConfigError(f"unknown init {init!r} for a video ViT; allowed: videomae")
    for key in ("num_classes", "fixed_pos_embed", "global_pool"):
        overrides.pop(key, None)
    size, patch, img = match.groups()
    embed_dim, depth, heads, mlp_ratio = SIZES[size]
    kwargs = {"img_size": int(img), "patch_size": int(patch), "embed_dim": embed_dim,
              "depth": depth, "num_heads": heads, "mlp_ratio": mlp_ratio, **overrides}
    known = set(VideoViT.__init__.__code__.co_varnames[1:VideoViT.__init__.__code__.co_argcount])
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise ConfigError(f"model.backbone_kwargs.{unknown[0]} does not apply to the video "
                          f"ViT {name!r}; allowed: {', '.join(sorted(known - {'norm'}))}")
    return VideoViT(norm=norm_layer(norm, kind="token", options=norm_options), **kwargs)
