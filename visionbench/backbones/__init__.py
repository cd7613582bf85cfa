"""Backbones by registry: a ``Family`` (ViT, ResNet, ...) declares the names it builds, the
norm kind it takes, its default norm and how its features are read; ``create_backbone(name)``
builds through the family that matches ``name``. A new family is one ``register_family``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from visionbench.backbones.resnet import create_resnet, is_resnet_name
from visionbench.backbones.video_vit import create_video_vit, is_video_vit_name
from visionbench.backbones.vit import create_vit, is_vit_name
from visionbench.backbones.weights import LoadReport, load_backbone_weights, read_state_dict
from visionbench.errors import ConfigError


@dataclass(frozen=True)
class Family:
    """A backbone family: the names it builds, the norm kind it takes (``visionbench.norms``
    catalog kinds), its default norm, how its features are read (``cls``/``mean``/``lastk``
    token pooling, or the global-pooled ``pooled`` vector and ``dense`` maps), its
    factory ``create(name, norm=, placement=, norm_options=, **kwargs)``, and ``stem``:
    the first layer of one of its modules (None for another family's), where a sealed input
    normalization (``backbones.sealed``) is applied."""

    name: str
    matches: Callable[[str], bool]
    norm_kind: str
    default_norm: str
    features: tuple[str, ...]
    create: Callable[..., nn.Module]
    example: str
    stem: Callable[[nn.Module], nn.Module | None]


FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    FAMILIES[family.name] = family
    return family


def family_of(name: str) -> Family:
    for family in FAMILIES.values():
        if family.matches(name):
            return family
    examples = "; ".join(f"{f.name}: {f.example}" for f in FAMILIES.values())
    raise ConfigError(f"unknown backbone {name!r}; allowed: {examples}")


def backbone_family(name: str) -> str:
    return family_of(name).name


def _create_resnet(name: str, *, norm: str, placement: str = "pre",
                   norm_options: dict | None = None, **kwargs) -> nn.Module:
    if placement != "pre":
        raise ConfigError(f"placement {placement!r} applies to ViT backbones only")
    kwargs.pop("init", None)
    kwargs.pop("fixed_pos_embed", None)
    for key in ("patch_size", "embed_dim", "depth", "num_heads"):
        if key in kwargs:
            raise ConfigError(f"model.backbone_kwargs.{key} does not apply to ResNet {name!r}")
    return create_resnet(name, norm=norm, norm_options=norm_options, **kwargs)


register_family(Family(
    "vit", is_vit_name, "token", "layernorm", ("cls", "mean", "lastk", "dense"), create_vit,
    "timm ViT names (vit_tiny_patch16_224, vit_small_patch16_224, vit_base_patch16_224, "
    "vit_large_patch16_224, vit_huge_patch14_224, DINOv2's vit_small_patch14_dinov2, ...)",
    lambda m: getattr(m, "patch_embed", None)))
register_family(Family(
    "resnet", is_resnet_name, "conv", "batchnorm", ("pooled", "dense"), _create_resnet,
    "ResNets (resnet18, resnet50, ...)",
    # timm's ResNet starts at conv1, the pre-activation ResNetV2 at stem
    lambda m: getattr(m, "conv1", None) or getattr(m, "stem", None)))
register_family(Family(
    "video_vit", is_video_vit_name, "token", "layernorm", ("mean",), create_video_vit,
    "VideoMAE's video ViTs over tubelets (video_vit_small_patch16_224, "
    "video_vit_base_patch16_224, ..., video_vit_giant_patch14_224)",
    lambda m: getattr(m, "patch_embed", None)))


def create_backbone(
    name: str, *, norm: str | None = None, placement: str = "pre",
    norm_options: dict | None = None, **kwargs
) -> nn.Module:
    """A headless backbone of ``name``'s family; ``norm=None`` takes the family's default;
    ``norm_options`` override that norm's catalog defaults."""
    family = family_of(name)
    return family.create(name, norm=norm or family.default_norm, placement=placement,
                         norm_options=norm_options, **kwargs)


__all__ = [
    "FAMILIES",
    "Family",
    "LoadReport",
    "backbone_family",
    "create_backbone",
    "create_resnet",
    "create_video_vit",
    "create_vit",
    "family_of",
    "register_family",
    "load_backbone_weights",
    "read_state_dict",
]
