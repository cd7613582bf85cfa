"""The embedded default data set "shapes": 10 classes told apart by the shape of one object.

Written as PNG files in the ImageFolder layout (``root/{train,val,test}/<class>/00000.png``)
and read back by ``ImageFolderDataset``, like any real data set. Colour, texture, clutter,
scale, rotation, position and occlusion are drawn from the same distributions for every
class, so only the object's spatial structure identifies it. Each image comes from its own
``np.random.default_rng([seed, split, class, index])``: deterministic and independent of
the order of generation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from visionbench.data.cache import default_cache_dir, write_once

GENERATOR_VERSION = 2
SUPERSAMPLE = 4
# Nuisance strengths. Version 2 keeps every nuisance of version 1 but at a strength a small
# ViT pretrained for a few CPU minutes can see through: at full strength (any rotation with
# mirroring, full-contrast texture, 3-7 clutter strokes) a 2,000-step MAE probed no better
# than random init (16 % vs 12 % top-1), here it does (see datasets/shapes.md).
TEXTURE_CONTRAST = 0.4  # background gradient and texture around their mean colour
CLUTTER_ITEMS = (0, 3)  # [low, high) number of clutter strokes and dots
MAX_ROTATION = math.radians(30)  # uniform in [-30, 30] degrees, no mirroring
SCALE_RANGE = (0.5, 0.85)  # object diameter as a fraction of the image
OCCLUSION_P = 0.35
SPLITS = ("train", "val", "test")

Polygon = np.ndarray  # (K, 2) vertices in object units: the object spans about [-1, 1]^2
Parts = list[tuple[Polygon, int]]  # polygons drawn in order on the mask, fill 255 or 0 (hole)


def _regular(n: int, radius: float, phase: float = 0.0) -> Polygon:
    angles = phase + 2 * np.pi * np.arange(n) / n
    return radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _disc(radius: float, cx: float = 0.0) -> Polygon:
    return _regular(64, radius) + np.array([cx, 0.0])


def _star(points: int = 5, outer: float = 1.0, inner: float = 0.42) -> Polygon:
    radii = np.where(np.arange(2 * points) % 2 == 0, outer, inner)
    angles = -np.pi / 2 + np.pi * np.arange(2 * points) / points
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def _poly(*xy: tuple[float, float]) -> Polygon:
    return np.array(xy, dtype=np.float64)


def _square(half: float) -> Polygon:
    return _poly((-half, -half), (half, -half), (half, half), (-half, half))


def _rect(x0: float, y0: float, x1: float, y1: float) -> Polygon:
    return _poly((x0, y0), (x1, y0), (x1, y1), (x0, y1))


SHAPES: dict[str, Callable[[], Parts]] = {
    "circle": lambda: [(_disc(0.85), 255)],
    "square": lambda: [(_square(0.72), 255)],
    "triangle": lambda: [(_regular(3, 1.0, -np.pi / 2) + np.array([0.0, 0.15]), 255)],
    "star": lambda: [(_star(), 255)],
    "cross": lambda: [(_rect(-1, -0.26, 1, 0.26), 255), (_rect(-0.26, -1, 0.26, 1), 255)],
    "ring": lambda: [(_disc(0.95), 255), (_disc(0.55), 0)],
    "frame": lambda: [(_square(0.75), 255), (_square(0.42), 0)],
    "arrow": lambda: [
        (_rect(-1, -0.2, 0.2, 0.2), 255),
        (_poly((0.15, -0.62), (1, 0), (0.15, 0.62)), 255),
    ],
    "crescent": lambda: [(_disc(0.92), 255), (_disc(0.78, cx=0.5), 0)],
    "l_shape": lambda: [(_rect(-0.7, -1, -0.22, 0.98), 255), (_rect(-0.7, 0.5, 0.75, 0.98), 255)],
}
SHAPES_CLASSES: list[str] = list(SHAPES)


# ----------------------------------------------------------------------------- drawing


def _luma(rgb: np.ndarray) -> float:
    return float(rgb @ np.array([0.299, 0.587, 0.114]))


def _background(rng: np.random.Generator, n: int) -> np.ndarray:
    """A two-colour linear gradient plus stripes or smooth noise blobs, (n, n, 3) float."""
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:n, 0:n] / (n - 1)
    t = (xx - 0.5) * np.cos(angle) + (yy - 0.5) * np.sin(angle)
    t = (t - t.min()) / (t.max() - t.min() + 1e-9)
    bg = c0 + t[..., None] * (c1 - c0)
    tint = rng.uniform(0.3, 1.0, 3) * rng.choice([-1.0, 1.0])
    if rng.random() < 0.5:
        period = rng.uniform(3, 9) * SUPERSAMPLE
        phi = rng.uniform(0, np.pi)
        wave = np.sin(
            2 * np.pi * (xx * np.cos(phi) + yy * np.sin(phi)) * (n - 1) / period
            + rng.uniform(0, 2 * np.pi)
        )
        texture = rng.uniform(8, 30) * wave
    else:
        cells = int(rng.integers(3, 9))
        noise = Image.fromarray(rng.uniform(0, 255, (cells, cells)).astype(np.uint8))
        smooth = np.asarray(noise.resize((n, n), Image.Resampling.BICUBIC), dtype=np.float64)
        texture = rng.uniform(20, 50) * (smooth / 127.5 - 1.0)
    out = bg + texture[..., None] * tint
    mean = out.mean(axis=(0, 1), keepdims=True)
    return np.clip(mean + TEXTURE_CONTRAST * (out - mean), 0, 255)


def _random_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(0, 256, 3))


def _clutter(draw: ImageDraw.ImageDraw, rng: np.random.Generator, n: int) -> None:
    """A few short line segments and dots in random colours."""
    for _ in range(int(rng.integers(*CLUTTER_ITEMS))):
        colour = _random_colour(rng)
        x, y = rng.uniform(0, n, 2)
        if rng.random() < 0.6:
            length = rng.uniform(0.06, 0.2) * n
            a = rng.uniform(0, 2 * np.pi)
            end = (x + length * math.cos(a), y + length * math.sin(a))
            draw.line([(x, y), end], fill=colour, width=int(rng.integers(1, 3)) * SUPERSAMPLE)
        else:
            r = rng.uniform(0.5, 1.5) * SUPERSAMPLE
            draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)


def _object_mask(
    parts: Parts, rng: np.random.Generator, n: int
) -> tuple[Image.Image, float, np.ndarray]:
    """The object's mask at a random scale, rotation and position."""
    extent = rng.uniform(*SCALE_RANGE) * n  # object diameter
    radius = extent / 2
    theta = rng.uniform(-MAX_ROTATION, MAX_ROTATION)
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    slack = (n - extent) / 2
    centre = n / 2 + rng.uniform(-slack, slack, 2) * 0.9
    mask = Image.new("L", (n, n), 0)
    draw = ImageDraw.Draw(mask)
    for polygon, fill in parts:
        xy = polygon @ rot.T * radius + centre
        draw.polygon([tuple(p) for p in xy], fill=fill)
    return mask, radius, centre


def _object_colour(rng: np.random.Generator, bg_under: np.ndarray) -> tuple[int, int, int]:
    """A colour whose luminance differs from the background under the object by >= 60."""
    bg_luma = _luma(bg_under)
    if rng.random() < 0.3:  # same hue as the background, only lighter or darker
        target = bg_luma + 70 if bg_luma < 128 else bg_luma - 70
        scaled = bg_under * (target / max(bg_luma, 1.0))
        if target > bg_luma:
            scaled = scaled + (target - _luma(scaled))
        return tuple(int(v) for v in np.clip(scaled, 0, 255))
    best, best_gap = None, -1.0
    for _ in range(30):
        colour = rng.integers(0, 256, 3)
        gap = abs(_luma(colour) - bg_luma)
        if gap >= 60:
            return tuple(int(v) for v in colour)
        if gap > best_gap:
            best, best_gap = colour, gap
    return tuple(int(v) for v in best)


def _occluder(
    draw: ImageDraw.ImageDraw, rng: np.random.Generator, radius: float, centre: np.ndarray
) -> None:
    """A small rectangle or blob over part of the object."""
    size = rng.uniform(0.25, 0.55) * radius
    angle, dist = rng.uniform(0, 2 * np.pi), rng.uniform(0.2, 0.8) * radius
    cx, cy = centre + dist * np.array([math.cos(angle), math.sin(angle)])
    w, h = size * rng.uniform(0.6, 1.4), size * rng.uniform(0.6, 1.4)
    box = [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]
    if rng.random() < 0.5:
        draw.rectangle(box, fill=_random_colour(rng))
    else:
        draw.ellipse(box, fill=_random_colour(rng))


def render_shape(class_name: str, image_size: int, rng: np.random.Generator) -> Image.Image:
    """One RGB image of ``class_name``, drawn at 4x and box-downsampled (antialiased)."""
    n = image_size * SUPERSAMPLE
    canvas = Image.fromarray(_background(rng, n).astype(np.uint8))
    _clutter(ImageDraw.Draw(canvas), rng, n)
    mask, radius, centre = _object_mask(SHAPES[class_name](), rng, n)
    weights = np.asarray(mask, dtype=np.float64)[..., None] / 255.0
    bg_under = (np.asarray(canvas, dtype=np.float64) * weights).sum((0, 1)) / max(
        weights.sum(), 1.0
    )
    canvas.paste(Image.new("RGB", (n, n), _object_colour(rng, bg_under)), mask=mask)
    if rng.random() < OCCLUSION_P:
        _occluder(ImageDraw.Draw(canvas), rng, radius, centre)
    return canvas.resize((image_size, image_size), Image.Resampling.BOX)


# ----------------------------------------------------------------------------- on disk


def shapes_root(
    image_size: int = 32,
    seed: int = 0,
    train_per_class: int = 200,
    val_per_class: int = 40,
    test_per_class: int = 40,
    cache_dir: str | Path | None = None,
) -> Path:
    """The cache folder of one parameter set, e.g. ``shapes-v1-32px-s0-n200-40-40``."""
    base = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    name = (
        f"shapes-v{GENERATOR_VERSION}-{image_size}px-s{seed}"
        f"-n{train_per_class}-{val_per_class}-{test_per_class}"
    )
    return base / name


def _params(image_size: int, train: int, val: int, test: int, seed: int) -> dict:
    return {
        "generator": "shapes",
        "version": GENERATOR_VERSION,
        "image_size": image_size,
        "per_class": {"train": train, "val": val, "test": test},
        "seed": seed,
        "classes": SHAPES_CLASSES,
    }


def _write_split(folder: Path, split_id: int, count: int, image_size: int, seed: int) -> None:
    total = count * len(SHAPES_CLASSES)
    with tqdm(total=total, desc=f"shapes {folder.name}", leave=False) as bar:
        for class_id, name in enumerate(SHAPES_CLASSES):
            class_dir = folder / name
            class_dir.mkdir(parents=True)
            for index in range(count):
                rng = np.random.default_rng([seed, split_id, class_id, index])
                render_shape(name, image_size, rng).save(class_dir / f"{index:05d}.png")
                bar.update()


def generate_shapes(
    root: str | Path,
    image_size: int = 32,
    train_per_class: int = 200,
    val_per_class: int = 40,
    test_per_class: int = 40,
    seed: int = 0,
) -> Path:
    """Write the shapes data set to ``root`` (ImageFolder layout) unless it is already there.

    Generation happens in a temporary sibling folder renamed to ``root`` once complete, so
    ``root`` is either absent or whole. A finished ``root`` with other parameters is an error.
    """
    wanted = _params(image_size, train_per_class, val_per_class, test_per_class, seed)

    def write(tmp: Path) -> None:
        counts = (train_per_class, val_per_class, test_per_class)
        for split_id, (split, count) in enumerate(zip(SPLITS, counts, strict=True)):
            _write_split(tmp / split, split_id, count, image_size, seed)

    return write_once(root, wanted, "shapes", write)


def prepare_shapes(
    image_size: int = 32,
    seed: int = 0,
    train_per_class: int = 200,
    val_per_class: int = 40,
    test_per_class: int = 40,
    cache_dir: str | Path | None = None,
) -> Path:
    """Generate (once) into the cache and return the folder, ready for ``load_splits``."""
    root = shapes_root(image_size, seed, train_per_class, val_per_class, test_per_class, cache_dir)
    return generate_shapes(root, image_size, train_per_class, val_per_class, test_per_class, seed)
