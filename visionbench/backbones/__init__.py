"""Backbone factories over timm. ``create_backbone(name, ...)`` dispatches by family."""

from __future__ import annotations

from torch import nn

from visionbench.backbones.resnet import create_resnet, is_resnet_name
from visionbench.backbones.vit import create_vit, is_vit_name
from visionbench.backbones.weights import LoadReport, load_backbone_weights, read_state_dict
from visionbench.errors import ConfigError


def backbone_family(name: str) -> str:
    if is_vit_name(name):
        return "vit"
    if is_resnet_name(name):
        return "resnet"
    raise ConfigError(
        f"unknown backbone {name!r}; allowed: timm ViT names (vit_tiny_patch16_224, "
        "vit_small_patch16_224, vit_base_patch16_224, vit_large_patch16_224, "
        "vit_huge_patch14_224, ...) and ResNets (resnet18, resnet50, ...)"
    )


def create_backbone(
    name: str, *, norm: str | None = None, placement: str = "pre",
    norm_options: dict | None = None, **kwargs
) -> nn.Module:
    """A headless backbone; ``norm=None`` takes the family's default (layernorm / batchnorm);
    ``norm_options`` override that norm's catalog defaults."""
    family = backbone_family(name)
    if family == "vit":
        return create_vit(name, norm=norm or "layernorm", placement=placement,
                          norm_options=norm_options, **kwargs)
    if placement != "pre":
        raise ConfigError(f"placement {placement!r} applies to ViT backbones only")
    kwargs.pop("init", None)
    kwargs.pop("fixed_pos_embed", None)
    for key in ("patch_size", "embed_dim", "depth", "num_heads"):
        if key in kwargs:
            raise ConfigError(f"model.backbone_kwargs.{key} does not apply to ResNet {name!r}")
    return create_resnet(name, norm=norm or "batchnorm", norm_options=norm_options, **kwargs)


__all__ = [
    "LoadReport",
    "backbone_family",
    "create_backbone",
    "create_resnet",
    "create_vit",
    "load_backbone_weights",
    "read_state_dict",
]
