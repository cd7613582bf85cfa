"""Conv norm layers beyond BatchNorm/GroupNorm: BCN + WS, EvoNorm B0/S0, and SELU networks.

Official code followed (read, not copied):

- ``bcn_ws``: joe-siyuan-qiao/Batch-Channel-Normalization, ``imagenet/models/layers.py``
  (``Conv2d``: weight standardization; ``BatchNorm2d`` -> ``GN``: a plain ``nn.BatchNorm2d``
  on batch statistics, then the channel normalization with one affine pair per group), which
  the ImageNet ResNets are built from: the default here. ``README.md`` (``BCNorm`` with
  ``estimate=True``, ``EstBN``: the micro-batch variant with estimated statistics) is the
  ``estimate=True`` option.
- ``evonorm_b0`` / ``evonorm_s0``: the layers are timm's ``EvoNorm2dB0`` / ``EvoNorm2dS0``,
  checked against the reference ``evonorm`` of tensorflow/tpu
  ``models/official/resnet/resnet_model.py`` (eps 1e-5, moving-average decay 0.9, 32 groups
  with the largest divisor <= 32 as fallback); that file also sets where they go (a
  pre-activation ResNet, see ``visionbench/backbones/resnet.py``).
- ``selu``: bioinf-jku/SNNs, ``Pytorch/SelfNormalizingNetworks_CNN_CIFAR10.ipynb`` (SELU in
  place of ReLU, no norm layers, ``kaiming_normal_(mode="fan_in", nonlinearity="linear")``,
  i.e. LeCun normal) and ``TF_1_x/selu.py`` (alpha dropout after the activation).

Where we differ, and why:

- BCN's estimate update rate ``momentum`` defaults to 0.1: the official ``EstBN`` keeps it in the
  buffer ``estbn_moving_speed`` (zero at construction, set by the training loop, which is not
  released); we keep that buffer, initialised to ``momentum``.
- timm's ``EvoNorm2dB0`` keeps the unbiased batch variance in ``running_var`` (as torch's BN);
  the reference averages the biased one. timm's EvoNorms take their statistics in float32.
- The SNN notebook sets biases to 0.1 under a "biases zero" comment; we set them to zero, as
  the paper's init. A headless ResNet has no biases anyway (convs without bias, no head).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from timm.layers import EvoNorm2dB0, EvoNorm2dS0
from torch import nn

from visionbench.norms.catalog import factory_kwargs, register_norm


def largest_divisor_at_most(dim: int, groups: int) -> int:
    """The reference's group fallback: the largest ``g <= groups`` that divides ``dim``."""
    return next(g for g in range(min(groups, dim), 0, -1) if dim % g == 0)


# --- Batch-Channel Normalization with Weight Standardization --------------------------------


class WSConv2d(nn.Conv2d):
    """Conv2d with Weight Standardization, as ``Conv2d`` of the official ``layers.py``.

    Each filter is centred over (in, kh, kw) and divided by ``sqrt(var + eps)``, with the
    unbiased variance (``Tensor.var``'s default, as in the official code). timm's
    ``StdConv2d`` is BiT's variant (biased variance, eps 1e-6), hence this class.
    """

    def __init__(self, *args, eps: float = 1e-5, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.eps = eps

    def standardized_weight(self) -> torch.Tensor:
        w = self.weight
        w = w - w.mean(dim=(1, 2, 3), keepdim=True)
        std = (w.flatten(1).var(dim=1) + self.eps).sqrt()
        return w / std.view(-1, 1, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.standardized_weight(), self.bias)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, eps: float = 1e-5) -> WSConv2d:
        """A WS conv with the same hyperparameters that shares ``conv``'s parameters."""
        ws = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
            padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
            bias=conv.bias is not None, padding_mode=conv.padding_mode, eps=eps, device="meta",
        )
        ws.weight = conv.weight
        ws.bias = conv.bias
        return ws


def convert_to_ws_conv(module: nn.Module, eps: float = 1e-5) -> nn.Module:
    """Swap every plain ``nn.Conv2d`` under ``module`` for a ``WSConv2d`` (weights kept)."""
    for name, child in module.named_children():
        if type(child) is nn.Conv2d:
            setattr(module, name, WSConv2d.from_conv(child, eps))
        else:
            convert_to_ws_conv(child, eps)
    return module


class EstimatedBatchNorm2d(nn.Module):
    """The batch part of micro-batch BCN (official ``EstBN``): normalizes with estimates.

    In training the estimates move towards the batch statistics at rate ``momentum`` (the
    official buffer ``estbn_moving_speed``), the variance taken around the previous mean
    estimate, without gradient; then, in training and in eval alike, the input is normalized
    with the (updated) estimates: ``weight * (x - mu_hat) / sqrt(var_hat + eps) + bias``.
    """

    def __init__(
        self, num_features: int, eps: float = 1e-5, momentum: float = 0.1, *, device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_features, **dd))
        self.bias = nn.Parameter(torch.zeros(num_features, **dd))
        self.register_buffer("running_mean", torch.zeros(num_features, **dd))
        self.register_buffer("running_var", torch.ones(num_features, **dd))
        self.register_buffer("num_batches_tracked", torch.tensor(0, device=device))
        self.register_buffer("estbn_moving_speed", torch.full((1,), momentum, **dd))

    @torch.no_grad()
    def _update_estimates(self, x: torch.Tensor) -> None:
        x = x.to(self.running_mean.dtype).transpose(0, 1).flatten(1)
        batch_mean = x.mean(dim=1)
        batch_var = (x - self.running_mean[:, None]).square().mean(dim=1)
        self.running_mean.lerp_(batch_mean, self.estbn_moving_speed)
        self.running_var.lerp_(batch_var, self.estbn_moving_speed)
        self.num_batches_tracked += 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self._update_estimates(x)
        shape = (1, -1, 1, 1)
        scale = self.weight / (self.running_var + self.eps).sqrt()
        shift = self.bias - self.running_mean * scale
        out = x.to(scale.dtype) * scale.view(shape) + shift.view(shape)
        return out.to(x.dtype)


class BatchChannelNorm2d(nn.Module):
    """Batch-Channel Normalization: a batch norm, then a channel (group) normalization.

    The channel part standardizes each sample over each group of channels and applies one
    scale/shift per group (``weight``/``bias`` of shape ``(1, groups, 1)``), as the official
    ``BCNorm``/``GN``. ``estimate=True`` takes the micro-batch batch part
    (``EstimatedBatchNorm2d``); ``estimate=False`` a plain ``nn.BatchNorm2d``.
    """

    def __init__(
        self, num_channels: int, num_groups: int = 32, eps: float = 1e-5,
        momentum: float = 0.1, estimate: bool = False, *, device=None, dtype=None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.num_channels = num_channels
        self.num_groups = num_groups
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(1, num_groups, 1, **dd))
        self.bias = nn.Parameter(torch.zeros(1, num_groups, 1, **dd))
        if estimate:
            self.bn = EstimatedBatchNorm2d(num_channels, momentum=momentum, **dd)
        else:
            self.bn = nn.BatchNorm2d(num_channels, momentum=momentum, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.group_norm(self.bn(x), self.num_groups, eps=self.eps)
        out = out.reshape(x.shape[0], self.num_groups, -1)
        out = out * self.weight.to(out.dtype) + self.bias.to(out.dtype)
        return out.view_as(x)


@register_norm(
    "bcn_ws",
    kind="conv",
    paper="Micro-Batch Training with Batch-Channel Normalization and Weight Standardization",
    arxiv="1903.10520",
    formula="y = BN(x) = w_c (x - mu_c) / sqrt(var_c + eps) + b_c (batch statistics; "
    "estimate=True: the micro-batch estimates mu_hat += r (mean_batch(x) - mu_hat), "
    "var_hat += r (mean_batch((x - mu_hat)^2) - var_hat)); "
    "BCN(x) = gamma_g (y - mean_g(y)) / sqrt(var_g(y) + eps) + beta_g; "
    "convs use W_hat = (W - mean(W)) / sqrt(var(W) + 1e-5) per output filter",
    defaults={"num_groups": 32, "eps": 1e-5, "momentum": 0.1, "estimate": False},
    where="after every convolution of a ResNet in place of BatchNorm, with every convolution "
    "weight-standardized (create_resnet swaps each Conv2d for a WSConv2d)",
)
def _bcn_ws(
    dim: int, num_groups: int = 32, eps: float = 1e-5, momentum: float = 0.1,
    estimate: bool = False, **kw,
) -> nn.Module:
    groups = math.gcd(num_groups, dim)  # narrow demo networks: as the catalog's groupnorm
    return BatchChannelNorm2d(
        dim, groups, eps=eps, momentum=momentum, estimate=estimate, **factory_kwargs(kw)
    )


# --- EvoNorm (norm + activation in one layer) ------------------------------------------------


@register_norm(
    "evonorm_b0",
    kind="conv",
    paper="Evolving Normalization-Activation Layers",
    arxiv="2004.02967",
    formula="gamma * x / max(sqrt(var_batch(x) + eps), v1 * x + sqrt(var_instance(x) + eps)) "
    "+ beta (var_batch: moving average in eval)",
    defaults={"eps": 1e-5, "momentum": 0.1, "apply_act": True},
    where="in place of every BN-ReLU pair of a pre-activation (v2) ResNet, no separate "
    "activation anywhere",
)
def _evonorm_b0(
    dim: int, eps: float = 1e-5, momentum: float = 0.1, apply_act: bool = True, **kw
) -> nn.Module:
    return EvoNorm2dB0(dim, apply_act=apply_act, momentum=momentum, eps=eps, **factory_kwargs(kw))


@register_norm(
    "evonorm_s0",
    kind="conv",
    paper="Evolving Normalization-Activation Layers",
    arxiv="2004.02967",
    formula="gamma * x * sigmoid(v1 * x) / sqrt(var_group(x) + eps) + beta",
    defaults={"groups": 32, "eps": 1e-5, "apply_act": True},
    where="in place of every BN-ReLU pair of a pre-activation (v2) ResNet, no separate "
    "activation anywhere",
)
def _evonorm_s0(
    dim: int, groups: int = 32, eps: float = 1e-5, apply_act: bool = True, **kw
) -> nn.Module:
    groups = largest_divisor_at_most(dim, groups)
    return EvoNorm2dS0(dim, groups=groups, apply_act=apply_act, eps=eps, **factory_kwargs(kw))


# --- Self-normalizing networks ----------------------------------------------------------------


@register_norm(
    "selu",
    kind="conv",
    paper="Self-Normalizing Neural Networks",
    arxiv="1706.02515",
    formula="no norm layer; act = lambda * (x if x > 0 else alpha * (exp(x) - 1)), "
    "lambda = 1.0507, alpha = 1.6733; weights ~ N(0, 1/fan_in); alpha dropout after the act",
    defaults={"alpha_dropout": 0.0},
    where="no norm layers (identity); SELU in place of every ReLU of a ResNet, LeCun-normal "
    "weights, optional alpha dropout after each SELU",
)
def _selu(dim: int, alpha_dropout: float = 0.0, **kw) -> nn.Module:
    return nn.Identity()  # the activation and init are set by the backbone (create_resnet)


def selu_act_layer(alpha_dropout: float = 0.0) -> Callable[..., nn.Module]:
    """The ``act_layer=`` for timm: SELU, followed by alpha dropout when the rate is > 0."""
    if not 0.0 <= alpha_dropout < 1.0:
        raise ValueError(f"alpha_dropout {alpha_dropout}: expected a rate in [0, 1)")

    def make_act(inplace: bool = False, **_) -> nn.Module:
        if alpha_dropout == 0.0:
            return nn.SELU(inplace=inplace)
        return nn.Sequential(nn.SELU(inplace=inplace), nn.AlphaDropout(alpha_dropout))

    return make_act


@torch.no_grad()
def lecun_normal_(module: nn.Module) -> nn.Module:
    """LeCun-normal init, N(0, 1/fan_in), of every conv and linear weight; biases zero."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="linear")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return module
