"""ResNets built through timm with the norm layer chosen by name (``batchnorm``, ``groupnorm``)."""

from __future__ import annotations

import re

import timm
from timm.models.resnet import ResNet

from visionbench.errors import ConfigError
from visionbench.norms import norm_layer

RESNET_NAME = re.compile(r"^resnet\d+[a-z]?$")


def is_resnet_name(name: str) -> bool:
    return bool(RESNET_NAME.match(name)) and name in timm.list_models("resnet*")


def create_resnet(name: str, *, norm: str = "batchnorm", **overrides) -> ResNet:
    """A headless (``num_classes=0``, global average pooled) timm ResNet."""
    if not is_resnet_name(name):
        raise ConfigError(f"unknown ResNet backbone {name!r}; expected a timm name like resnet50")
    overrides.pop("img_size", None)  # a ResNet takes any size
    overrides.setdefault("num_classes", 0)
    return timm.create_model(
        name, pretrained=False, norm_layer=norm_layer(norm, kind="conv"), **overrides
    )
