"""ResNets built through timm with the conv norm layer chosen by name.

Most norms go where BatchNorm goes in timm's (post-activation, v1) ``ResNet``. Three entries
change more than the norm layer, each as its official code builds its ResNet:

- ``bcn_ws``: every convolution becomes weight-standardized (``WSConv2d``), as the ResNets of
  joe-siyuan-qiao/Batch-Channel-Normalization ``imagenet/models/imagenet/resnet.py`` are built
  from ``layers.Conv2d``; the last norm of each residual branch starts at zero scale there as
  here (timm's ``zero_init_last``).
- ``evonorm_b0`` / ``evonorm_s0``: EvoNorms are normalization-activation layers that take the
  place of BN-ReLU pairs. The reference, tensorflow/tpu
  ``models/official/resnet/resnet_model.py`` (``resnet``: "Evonorms require the pre-activation
  form."), uses them only in the pre-activation ResNet (v2), where every norm is followed by
  its ReLU, so every BN-ReLU pair becomes one EvoNorm, and where no ReLU follows the residual
  addition (``return inputs + shortcut``): the next block's EvoNorm is the nonlinearity. We
  build the same: timm's ``ResNetV2`` of the same depth and stem (``resnet18`` ->
  ``resnetv2_18``, ``resnet50d`` -> ``resnetv2_50d``), EvoNorm as its norm-act layer, plain
  convolutions, and no activation module at all.
- ``selu``: no norm layers, SELU in place of every ReLU (the one after the residual addition
  too), LeCun-normal weights and optional alpha dropout after each SELU (``alpha_dropout=``),
  after bioinf-jku/SNNs ``Pytorch/SelfNormalizingNetworks_CNN_CIFAR10.ipynb``.
"""

from __future__ import annotations

import re

import timm
from timm.layers import BatchNormAct2d, GroupNormAct
from timm.models.resnet import ResNet
from timm.models.resnetv2 import ResNetV2

from visionbench.errors import ConfigError
from visionbench.norms import norm_layer, norm_spec
from visionbench.norms.conv import convert_to_ws_conv, lecun_normal_, selu_act_layer

RESNET_NAME = re.compile(r"^resnet\d+[a-z]?$")
EVONORMS = ("evonorm_b0", "evonorm_s0")
# Norms of the pre-activation ResNetV2: the EvoNorms, and the BN-ReLU / GN-ReLU baselines as
# timm's norm-act layers (GroupNormAct: 32 groups, as the catalog's groupnorm).
NORM_ACT = {"batchnorm": BatchNormAct2d, "groupnorm": GroupNormAct}
PREACT_NORMS = (*EVONORMS, *NORM_ACT)


def is_resnet_name(name: str) -> bool:
    return bool(RESNET_NAME.match(name)) and name in timm.list_models("resnet*")


def preact_name(name: str) -> str:
    """timm's pre-activation counterpart of a ResNet name: ``resnet50d`` -> ``resnetv2_50d``."""
    return "resnetv2_" + name.removeprefix("resnet")


def create_resnet(name: str, *, norm: str = "batchnorm", norm_options: dict | None = None,
                  preact: bool | None = None, **overrides) -> ResNet | ResNetV2:
    """A headless (``num_classes=0``, global average pooled) timm ResNet with ``norm``.

    ``alpha_dropout=`` (the alpha dropout rate after each SELU) applies to ``norm="selu"`` only.
    EvoNorms give a pre-activation ``ResNetV2`` (see the module docstring). ``preact=True``
    builds that same ``ResNetV2`` with another norm (its BN-ReLU pairs as timm's norm-act
    layers): the like-for-like baseline of the EvoNorm entries. ``norm_options`` override the
    norm's catalog defaults.
    """
    if not is_resnet_name(name):
        raise ConfigError(f"unknown ResNet backbone {name!r}; expected a timm name like resnet50")
    overrides.pop("img_size", None)  # a ResNet takes any size
    overrides.setdefault("num_classes", 0)
    if preact is None:
        preact = norm in EVONORMS
    if norm in EVONORMS and not preact:
        raise ConfigError(f"norm {norm!r} needs the pre-activation ResNet (preact: true)")
    if preact and norm not in PREACT_NORMS:
        raise ConfigError(f"a pre-activation ResNet takes one of {', '.join(PREACT_NORMS)}, "
                          f"not {norm!r}")
    layer = norm_layer(norm, kind="conv", options=norm_options)
    alpha_dropout = overrides.pop("alpha_dropout", None)
    if alpha_dropout is not None and norm != "selu":
        raise ConfigError(f"alpha_dropout applies to norm 'selu' only, not {norm!r}")

    if preact:
        variant = preact_name(name)
        if variant not in timm.list_models("resnetv2_*"):
            allowed = sorted(n.replace("resnetv2_", "resnet") for n in timm.list_models(
                "resnetv2_*") if re.match(r"^resnetv2_\d+[a-z]?$", n))
            raise ConfigError(
                f"norm {norm!r} needs a pre-activation ResNet and timm has none for {name!r}; "
                f"allowed: {', '.join(allowed)}"
            )
        if norm not in EVONORMS:  # BN-ReLU / GN-ReLU as timm's norm-act layers
            layer = NORM_ACT[norm]
            if norm_options:
                raise ConfigError(f"norm_options do not apply to the pre-activation {norm}")
        return timm.create_model(variant, pretrained=False, norm_layer=layer, **overrides)

    if norm == "selu":
        if alpha_dropout is None:
            alpha_dropout = norm_spec("selu", "conv").defaults["alpha_dropout"]
        if not 0.0 <= alpha_dropout < 1.0:
            raise ConfigError(f"alpha_dropout {alpha_dropout}: expected a rate in [0, 1)")
        overrides["act_layer"] = selu_act_layer(alpha_dropout)
    model = timm.create_model(name, pretrained=False, norm_layer=layer, **overrides)
    if norm == "bcn_ws":
        convert_to_ws_conv(model)
    if norm == "selu":
        lecun_normal_(model)
    return model
