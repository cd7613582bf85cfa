"""Vision Transformers built through timm, with the norm layer chosen by name.

Any timm ViT name (``vit_tiny_patch16_224`` ... ``vit_huge_patch14_224``) is a starting point;
constructor arguments (``img_size``, ``patch_size``, ``embed_dim``, ``depth``, ``num_heads``,
``in_chans``, ...) override its defaults, so one name covers every size. ``init="mae"`` gives the
initialisation of facebookresearch/mae ``models_mae.py``: fixed 2-D sin-cos position embeddings
(class slot zero), xavier-uniform linears and patch projection (seen as 2-D), normal(0.02)
class token, LayerNorm weight 1 / bias 0.

``placement`` puts the norm where a paper puts it (``pre``, ``post``, ``peri``, ``mix``, ``lns``;
see ``visionbench/backbones/placements.py`` for the formulas and the official code followed).
It is recorded as ``model.placement``; ``block_placement(model)`` lists it block by block.
"""

from __future__ import annotations

import re

import timm
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from visionbench.backbones.placements import (
    PLACEMENTS,
    add_embedding_norm,
    block_placement,
    placement_kwargs,
)
from visionbench.backbones.pos_embed import fixed_sincos_
from visionbench.errors import ConfigError
from visionbench.norms import norm_layer, norm_spec

VIT_NAME = re.compile(r"^vit_(tiny|small|base|large|huge|giant)_patch\d+_(\d+|dinov2)$")

__all__ = [
    "PLACEMENTS",
    "block_placement",
    "create_vit",
    "grid_size",
    "in_chans",
    "init_linear_and_norm_",
    "is_vit_name",
    "mae_init_",
    "model_depth",
    "patch_size",
]


def is_vit_name(name: str) -> bool:
    return bool(VIT_NAME.match(name)) and name in timm.list_models("vit_*")


def create_vit(
    name: str,
    *,
    norm: str = "layernorm",
    placement: str = "pre",
    mix_alpha: float | None = None,
    init: str = "mae",
    fixed_pos_embed: bool = True,
    norm_options: dict | None = None,
    **overrides,
) -> VisionTransformer:
    """A headless (``num_classes=0``) timm ViT with the ``norm`` layer and ``placement``.

    ``mix_alpha`` (placement ``mix`` only, default 0.25) is the fraction of blocks, counted
    from the input and rounded down, that use Post-LN. ``norm_options`` override the norm's
    catalog defaults; norms that depend on the attention (PowerNorm's groups) get its head
    count.
    """
    if not is_vit_name(name):
        raise ConfigError(
            f"unknown ViT backbone {name!r}; expected a timm name like vit_base_patch16_224"
        )
    if placement not in PLACEMENTS:
        raise ConfigError(f"unknown placement {placement!r}; allowed: {', '.join(PLACEMENTS)}")
    if init not in ("mae", "timm"):
        raise ConfigError(f"unknown init {init!r}; allowed: mae, timm")
    overrides.setdefault("num_classes", 0)
    make_norm = norm_layer(norm, kind="token", options=norm_options)  # checks the name first
    if norm_spec(norm, "token").context:  # PowerNorm: groups = the attention heads
        make_norm = norm_layer(norm, kind="token", options=norm_options,
                               context={"num_heads": model_heads(name, overrides)})
    depth = model_depth(name, overrides) if placement == "mix" else None
    structure = placement_kwargs(placement, depth, mix_alpha)
    fixed = sorted(set(structure) & set(overrides))
    if fixed:
        raise ConfigError(f"{', '.join(fixed)} is set by placement {placement!r}; drop it")
    model = timm.create_model(
        name, pretrained=False, norm_layer=make_norm, **structure, **overrides
    )
    if placement == "peri":
        add_embedding_norm(model, make_norm)
    model.placement = placement
    if init == "mae":
        mae_init_(model, fixed_pos_embed=fixed_pos_embed)
    return model


def _meta_build(name: str, overrides: dict) -> VisionTransformer:
    rest = {k: v for k, v in overrides.items() if k not in ("device", "dtype")}
    return timm.create_model(name, pretrained=False, device="meta", **rest)


def model_depth(name: str, overrides: dict) -> int:
    """The number of blocks ``name`` gets with ``overrides``, read off a meta-device build."""
    if "depth" in overrides:
        return int(overrides["depth"])
    return len(_meta_build(name, overrides).blocks)


def model_heads(name: str, overrides: dict) -> int:
    """The attention head count ``name`` gets with ``overrides``."""
    if "num_heads" in overrides:
        return int(overrides["num_heads"])
    return int(_meta_build(name, overrides).blocks[0].attn.num_heads)


def mae_init_(model: VisionTransformer, fixed_pos_embed: bool = True) -> None:
    """MAE's ``initialize_weights`` applied to a timm ViT encoder."""
    if fixed_pos_embed:
        fixed_sincos_(model.pos_embed, model.patch_embed.grid_size, model.num_prefix_tokens)
    w = model.patch_embed.proj.weight
    nn.init.xavier_uniform_(w.data.view(w.shape[0], -1))
    if model.cls_token is not None:
        nn.init.normal_(model.cls_token, std=0.02)
    for name, module in model.named_modules():
        if name == "patch_embed.proj":
            continue
        init_linear_and_norm_(module)


def init_linear_and_norm_(module: nn.Module) -> None:
    """MAE's ``_init_weights``: xavier-uniform Linear, zero bias; norm weight 1, bias 0."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        if module.weight is not None:
            nn.init.ones_(module.weight)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)


def grid_size(model: VisionTransformer) -> tuple[int, int]:
    return tuple(model.patch_embed.grid_size)


def patch_size(model: VisionTransformer) -> int:
    return int(model.patch_embed.patch_size[0])


def in_chans(model: VisionTransformer) -> int:
    return int(model.patch_embed.proj.in_channels)


