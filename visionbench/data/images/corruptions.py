"""ImageNet-C style corruptions at five severities, deterministic from a seed.

"Benchmarking Neural Network Robustness to Common Corruptions and Perturbations" (Hendrycks
and Dietterich, ICLR 2019, arXiv 1903.12261). Followed: hendrycks/robustness
``ImageNet-C/create_c/make_imagenet_c.py`` (224 px), ``make_tinyimagenet_c.py`` (64 px) and
``make_cifar_c.py`` (32 px): the same eight functions with each script's severity parameters,
chosen by image size (``scale_for``). Every function takes and returns an ``HxWx3`` uint8
array; as the official scripts, the float result is clipped to [0, 255] and truncated to
uint8 (``np.uint8``).

- ``gaussian_noise``: ``x / 255 + N(0, c)``; ``shot_noise``: ``Poisson(x c) / c``;
- ``defocus_blur``: a disk of radius ``c[0]`` (17 x 17 up to radius 8), antialiased by a
  Gaussian of sigma ``c[1]`` (OpenCV's ``GaussianBlur`` of the disk, 3 x 3 or 5 x 5), applied
  per channel with reflect-101 borders (OpenCV's ``filter2D`` default);
- ``motion_blur``: ImageMagick's ``MotionBlurImage`` (MagickCore ``effect.c``), written out:
  ``2 ceil(r) + 1`` taps weighted ``exp(-i^2 / 2 sigma^2)`` (normalized) at offsets
  ``round(i cos a), round(i sin a)`` on one side of the pixel, edge pixels repeated, angle
  ``a ~ U(-45, 45)`` degrees. The official scripts call it through Wand; here it is numpy;
- ``contrast``: ``(x - mean) c + mean`` with the per-channel spatial mean;
- ``fog``: the diamond-square plasma fractal (``plasma_fractal``, with the official
  ``wibble * U(-wibble, wibble)`` perturbation), ``x + c[0] fractal`` rescaled by
  ``max(x) / (max(x) + c[0])``;
- ``jpeg_compression``: a PIL JPEG round trip at quality ``c``;
- ``pixelate``: a box downsample to ``size c`` and back up, both with PIL's BOX filter.

Randomness (noise, the motion angle, the fractal) comes from the ``numpy.random.Generator``
passed in, so a corrupted set is the same for the same seed. Deviations: the official scripts
draw from numpy's global state; the official ImageNet-C files were saved as JPEG (quality 85),
which adds a compression of its own to every corruption: ``write_corrupted`` writes PNG.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

CORRUPTIONS = ("gaussian_noise", "shot_noise", "defocus_blur", "motion_blur", "contrast",
               "fog", "jpeg_compression", "pixelate")
SEVERITIES = (1, 2, 3, 4, 5)
SCALES = ("cifar", "tiny", "imagenet")  # the official scripts: 32, 64 and 224 px

# Severity parameters c of each script, severities 1-5.
PARAMETERS: dict[str, dict[str, list]] = {
    "gaussian_noise": {"imagenet": [0.08, 0.12, 0.18, 0.26, 0.38],
                       "tiny": [0.04, 0.08, 0.12, 0.15, 0.18],
                       "cifar": [0.04, 0.06, 0.08, 0.09, 0.10]},
    "shot_noise": {"imagenet": [60, 25, 12, 5, 3], "tiny": [250, 100, 50, 30, 15],
                   "cifar": [500, 250, 100, 75, 50]},
    "defocus_blur": {"imagenet": [(3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5)],
                     "tiny": [(0.5, 0.6), (1, 0.1), (1.5, 0.1), (2.5, 0.01), (3, 0.1)],
                     "cifar": [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)]},
    "motion_blur": {"imagenet": [(10, 3), (15, 5), (15, 8), (15, 12), (20, 15)],
                    "tiny": [(10, 1), (10, 1.5), (10, 2), (10, 2.5), (12, 3)],
                    "cifar": [(6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)]},
    "contrast": {"imagenet": [0.4, 0.3, 0.2, 0.1, 0.05], "tiny": [0.4, 0.3, 0.2, 0.1, 0.05],
                 "cifar": [0.75, 0.5, 0.4, 0.3, 0.15]},
    "fog": {"imagenet": [(1.5, 2), (2, 2), (2.5, 1.7), (2.5, 1.5), (3, 1.4)],
            "tiny": [(0.4, 3), (0.7, 3), (1, 2.5), (1.5, 2), (2, 1.75)],
            "cifar": [(0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)]},
    "jpeg_compression": {"imagenet": [25, 18, 15, 10, 7], "tiny": [65, 58, 50, 40, 25],
                         "cifar": [80, 65, 58, 50, 40]},
    "pixelate": {"imagenet": [0.6, 0.5, 0.4, 0.3, 0.25], "tiny": [0.9, 0.8, 0.7, 0.6, 0.5],
                 "cifar": [0.95, 0.9, 0.85, 0.75, 0.65]},
}


def scale_for(size: int) -> str:
    """The official parameter set for images of side ``size``: CIFAR-10-C up to 32 px,
    Tiny-ImageNet-C up to 64 px, ImageNet-C above."""
    return "cifar" if size <= 32 else "tiny" if size <= 64 else "imagenet"


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.uint8(np.clip(x, 0, 255))  # truncation, as np.uint8 in the official scripts


def gaussian_noise(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    x = x / 255.0
    return np.clip(x + rng.normal(size=x.shape, scale=c), 0, 1) * 255


def shot_noise(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    x = x / 255.0
    return np.clip(rng.poisson(x * c) / float(c), 0, 1) * 255


def _filter(channels: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """``cv2.filter2D`` of every channel of ``HxWxC`` with a symmetric odd ``kernel``,
    reflect-101 borders (numpy's ``reflect``)."""
    kh, kw = kernel.shape
    padded = np.pad(channels.astype(np.float64), ((kh // 2, kh // 2), (kw // 2, kw // 2),
                                                  (0, 0)), mode="reflect")
    x = torch.from_numpy(np.ascontiguousarray(padded.transpose(2, 0, 1)))[:, None]
    out = F.conv2d(x, torch.from_numpy(kernel.astype(np.float64))[None, None])
    return out[:, 0].numpy().transpose(1, 2, 0)


def _gaussian_kernel_1d(size: int, sigma: float) -> np.ndarray:
    """``cv2.getGaussianKernel(size, sigma)``."""
    i = np.arange(size) - (size - 1) / 2
    g = np.exp(-(i**2) / (2 * sigma**2))
    return g / g.sum()


def disk(radius: float, alias_blur: float = 0.1) -> np.ndarray:
    """The official ``disk``: an aliased disk on a 17 x 17 grid (larger above radius 8),
    normalized, then blurred by ``cv2.GaussianBlur`` (3 x 3 or 5 x 5, sigma ``alias_blur``)."""
    if radius <= 8:
        grid, ksize = np.arange(-8, 9), 3
    else:
        grid, ksize = np.arange(-radius, radius + 1), 5
    xx, yy = np.meshgrid(grid, grid)
    aliased = np.array((xx**2 + yy**2) <= radius**2, dtype=np.float64)
    aliased /= aliased.sum()
    g = _gaussian_kernel_1d(ksize, alias_blur)
    return _filter(aliased[..., None], np.outer(g, g))[..., 0]


def defocus_blur(x: np.ndarray, c: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    x = x / 255.0
    return np.clip(_filter(x, disk(c[0], c[1])), 0, 1) * 255


def motion_blur(x: np.ndarray, c: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    radius, sigma = c
    angle = math.radians(rng.uniform(-45, 45))
    width = int(2 * math.ceil(radius) + 1)  # GetOptimalKernelWidth1D for radius > 0
    taps = np.arange(width)
    weights = np.exp(-(taps.astype(np.float64) ** 2) / (2 * sigma**2))
    weights /= weights.sum()
    dx = np.ceil(taps * math.cos(angle) - 0.5).astype(int)
    dy = np.ceil(taps * math.sin(angle) - 0.5).astype(int)
    h, w = x.shape[:2]
    rows, cols = np.arange(h)[:, None], np.arange(w)[None, :]
    out = np.zeros(x.shape, dtype=np.float64)
    for k in range(width):  # edge virtual pixels: coordinates clamped into the image
        r = np.clip(rows + dy[k], 0, h - 1)
        q = np.clip(cols + dx[k], 0, w - 1)
        out += weights[k] * x[r, q].astype(np.float64)
    return np.clip(np.rint(out), 0, 255)  # ImageMagick's ClampToQuantum rounds


def contrast(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    x = x / 255.0
    means = np.mean(x, axis=(0, 1), keepdims=True)
    return np.clip((x - means) * c + means, 0, 1) * 255


def plasma_fractal(mapsize: int, wibbledecay: float, rng: np.random.Generator) -> np.ndarray:
    """The official diamond-square height map, ``mapsize`` a power of two, values in [0, 1]."""
    if mapsize & (mapsize - 1):
        raise ValueError(f"plasma_fractal: mapsize {mapsize} is not a power of two")
    maparray = np.empty((mapsize, mapsize), dtype=np.float64)
    maparray[0, 0] = 0
    stepsize = mapsize
    wibble = 100.0

    def wibbledmean(array: np.ndarray) -> np.ndarray:
        return array / 4 + wibble * rng.uniform(-wibble, wibble, array.shape)

    while stepsize >= 2:
        half = stepsize // 2
        corners = maparray[0:mapsize:stepsize, 0:mapsize:stepsize]
        square = corners + np.roll(corners, shift=-1, axis=0)
        square += np.roll(square, shift=-1, axis=1)
        maparray[half:mapsize:stepsize, half:mapsize:stepsize] = wibbledmean(square)
        centres = maparray[half:mapsize:stepsize, half:mapsize:stepsize]
        corners = maparray[0:mapsize:stepsize, 0:mapsize:stepsize]
        left = centres + np.roll(centres, 1, axis=0) + corners + np.roll(corners, -1, axis=1)
        maparray[0:mapsize:stepsize, half:mapsize:stepsize] = wibbledmean(left)
        top = centres + np.roll(centres, 1, axis=1) + corners + np.roll(corners, -1, axis=0)
        maparray[half:mapsize:stepsize, 0:mapsize:stepsize] = wibbledmean(top)
        stepsize //= 2
        wibble /= wibbledecay
    maparray -= maparray.min()
    return maparray / maparray.max()


def fog(x: np.ndarray, c: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    h, w = x.shape[:2]
    mapsize = 1 << max(1, math.ceil(math.log2(max(h, w))))
    x = x / 255.0
    max_val = x.max()
    x = x + c[0] * plasma_fractal(mapsize, c[1], rng)[:h, :w][..., None]
    return np.clip(x * max_val / (max_val + c[0]), 0, 1) * 255


def jpeg_compression(x: np.ndarray, c: int, rng: np.random.Generator) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(x).save(buffer, "JPEG", quality=int(c))
    return np.array(Image.open(buffer).convert("RGB"))


def pixelate(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    h, w = x.shape[:2]
    img = Image.fromarray(x).resize((int(w * c), int(h * c)), Image.Resampling.BOX)
    return np.array(img.resize((w, h), Image.Resampling.BOX))


FUNCTIONS: dict[str, Callable[[np.ndarray, object, np.random.Generator], np.ndarray]] = {
    "gaussian_noise": gaussian_noise, "shot_noise": shot_noise, "defocus_blur": defocus_blur,
    "motion_blur": motion_blur, "contrast": contrast, "fog": fog,
    "jpeg_compression": jpeg_compression, "pixelate": pixelate,
}


def corrupt(image: np.ndarray, corruption: str, severity: int, rng: np.random.Generator,
            scale: str | None = None) -> np.ndarray:
    """``image`` (``HxWx3`` uint8) with ``corruption`` at ``severity`` (1-5); ``scale`` picks
    the official parameter set (default: by the image's size)."""
    if corruption not in FUNCTIONS:
        raise ValueError(f"unknown corruption {corruption!r}; allowed: {', '.join(CORRUPTIONS)}")
    if severity not in SEVERITIES:
        raise ValueError(f"severity {severity}: expected 1-5")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 uint8 image, got {image.dtype} {image.shape}")
    scale = scale or scale_for(min(image.shape[:2]))
    c = PARAMETERS[corruption][scale][severity - 1]
    return _to_uint8(FUNCTIONS[corruption](image, c, rng))


def image_rng(seed: int, corruption: str, severity: int, index: int) -> np.random.Generator:
    """The generator of one corrupted image: independent of the order of generation."""
    return np.random.default_rng([seed, CORRUPTIONS.index(corruption), severity, index])
