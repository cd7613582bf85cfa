"""Input normalization sealed into an evaluated encoder.

torchgeo-bench / GEO-Bench give each model its own input transform, so that a data set
returns its stored values (8-bit images scaled to [0, 1], reflectances, ...) and the model
brings them to what it was trained on. Here an ``InputSpec`` (per-channel ``scale``, then
mean / std, and optionally a resize to the encoder's input size) is attached to the encoder
and applied by a forward pre-hook on its first layer (the family's ``stem``: a ViT's
``patch_embed``, a ResNet's ``conv1``), so every entry point (``forward``,
``forward_features``, ``forward_intermediates``) sees the same input. Input size and
normalization are then axes a protocol varies on the encoder, the reader unchanged.

The spec's buffers are not persistent: an encoder saved after sealing has the same keys
as before. ``(x * scale - mean) / std`` in float32 is bit-for-bit torchvision's
``Normalize`` on ``x`` when ``scale`` is 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from visionbench.errors import ConfigError

INTERPOLATIONS = ("nearest", "bilinear", "bicubic")


@dataclass(frozen=True)
class InputSpec:
    """What the encoder expects: ``(x * scale - mean) / std`` per channel, at ``size``
    (None: the size given) by ``interpolation`` (antialiased when downsampling, as
    torchvision's ``Resize`` on tensors)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    scale: float = 1.0
    size: int | None = None
    interpolation: str = "bicubic"

    def __post_init__(self) -> None:
        if len(self.mean) != len(self.std):
            raise ConfigError(f"input normalization: {len(self.mean)} means but "
                              f"{len(self.std)} stds")
        if any(s <= 0 for s in self.std):
            raise ConfigError(f"input normalization: std must be positive, got {self.std}")
        if self.interpolation not in INTERPOLATIONS:
            raise ConfigError(f"input interpolation: {self.interpolation!r}; allowed: "
                              f"{', '.join(INTERPOLATIONS)}")
        if self.size is not None and self.size < 1:
            raise ConfigError(f"input size: {self.size} (expected a positive integer)")

    @classmethod
    def of(cls, mean: Sequence[float], std: Sequence[float], **kwargs) -> InputSpec:
        return cls(tuple(float(v) for v in mean), tuple(float(v) for v in std), **kwargs)


class InputNormalization(nn.Module):
    """``InputSpec`` as a module: resize (when ``size`` is set and differs), then
    ``(x * scale - mean) / std``."""

    def __init__(self, spec: InputSpec) -> None:
        super().__init__()
        self.spec = spec
        shape = (1, len(spec.mean), 1, 1)
        self.register_buffer("mean", torch.tensor(spec.mean).view(shape), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(shape), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim not in (4, 5) or x.shape[1] != self.mean.shape[1]:
            raise ValueError(f"sealed input normalization: expected (B, {self.mean.shape[1]}, "
                             f"H, W) images or (B, {self.mean.shape[1]}, T, H, W) clips, got "
                             f"{tuple(x.shape)}")
        size = self.spec.size
        if size is not None and tuple(x.shape[-2:]) != (size, size):
            mode = self.spec.interpolation
            smooth = mode != "nearest"
            frames = x.transpose(1, 2).flatten(0, 1) if x.ndim == 5 else x  # each frame
            frames = F.interpolate(frames, size=(size, size), mode=mode,
                                   align_corners=False if smooth else None,
                                   antialias=smooth and size < min(x.shape[-2:]))
            x = frames.unflatten(0, (x.shape[0], x.shape[2])).transpose(1, 2) \
                if x.ndim == 5 else frames
        if self.spec.scale != 1.0:
            x = x * self.spec.scale
        shape = (1, -1) + (1,) * (x.ndim - 2)
        return (x - self.mean.to(x).view(shape)) / self.std.to(x).view(shape)

    def pre_hook(self, _module: nn.Module, args: tuple) -> tuple:
        """The forward pre-hook on the encoder's first layer (a bound method, so that a
        deep copy of the encoder hooks its own copy of this module)."""
        return (self(args[0]), *args[1:])


def _stem(encoder: nn.Module) -> nn.Module:
    from visionbench.backbones import FAMILIES

    for family in FAMILIES.values():
        stem = family.stem(encoder)
        if stem is not None:
            return stem
    raise ConfigError(f"{type(encoder).__name__}: no backbone family knows its first layer; "
                      "input normalization cannot be sealed into it")


def seal(encoder: nn.Module, spec: InputSpec) -> nn.Module:
    """Attach ``spec`` to ``encoder`` (in place, returned): its first layer then normalizes
    the raw input. Sealing again replaces the spec."""
    unseal(encoder)
    norm = InputNormalization(spec)
    stem = _stem(encoder)
    encoder.input_normalization = norm
    encoder._input_normalization_hook = stem.register_forward_pre_hook(norm.pre_hook)
    return encoder


def unseal(encoder: nn.Module) -> nn.Module:
    """Remove a sealed spec (the encoder then takes normalized input again)."""
    hook = getattr(encoder, "_input_normalization_hook", None)
    if hook is not None:
        hook.remove()
        del encoder._input_normalization_hook
        del encoder.input_normalization
    return encoder


def input_spec(encoder: nn.Module) -> InputSpec | None:
    """The spec sealed into ``encoder``, or None."""
    norm = getattr(encoder, "input_normalization", None)
    return norm.spec if isinstance(norm, InputNormalization) else None
