"""The embedded default detection data set "scenes": 1-4 shapes per image, boxed.

Each image is drawn with the drawing code of the ``shapes`` generator (its textured
two-colour background, its clutter strokes, its ten shape outlines and its contrast rule
for the object colour): 1 to 4 objects of distinct shape classes, each at its own scale
(diameter 22-45 % of the image side), rotation (+-30 degrees) and position. Objects never
overlap (their boxes are disjoint), so every box is the tight box of the object's visible
pixels: the smallest pixel-aligned box holding every pixel the object covers at all
(after the 4x supersampled drawing is box-downsampled). No occluders are drawn.

Written once into the cache as a Pascal VOC folder (``write_voc``; splits ``trainval`` and
``test``) and read back with ``VOCDetection(root, split, classes=SCENE_CLASSES)`` like any
real VOC data set. Each image comes from its own ``np.random.default_rng([seed, split,
index])``: deterministic and independent of how many are generated.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from visionbench.data.images.voc import VOCDetection, write_voc

try:
    from visionbench.data.images import shapes as _shapes
except ImportError:  # pragma: no cover - the layout before data/images/
    from visionbench.data.synth import shapes as _shapes

from visionbench.data.cache import default_cache_dir, write_once

GENERATOR_VERSION = 1
SCENE_CLASSES: list[str] = list(_shapes.SHAPES_CLASSES)
SPLITS = ("trainval", "test")
OBJECTS = (1, 4)  # inclusive range of objects per image
SCALE_RANGE = (0.22, 0.45)  # object diameter as a fraction of the image side
PLACEMENT_TRIES = 40  # positions tried per object before it is left out


def _transformed(parts: list, radius: float, theta: float) -> list[tuple[np.ndarray, int]]:
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    return [(polygon @ rot.T * radius, fill) for polygon, fill in parts]


def _coverage(parts: list[tuple[np.ndarray, int]], centre: np.ndarray, n: int,
              image_size: int) -> tuple[Image.Image, np.ndarray]:
    """The supersampled binary mask and its box-downsampled coverage (0..255) per pixel."""
    mask = Image.new("L", (n, n), 0)
    draw = ImageDraw.Draw(mask)
    for polygon, fill in parts:
        draw.polygon([tuple(p) for p in polygon + centre], fill=fill)
    small = mask.resize((image_size, image_size), Image.Resampling.BOX)
    return mask, np.asarray(small)


def tight_box(coverage: np.ndarray) -> tuple[int, int, int, int] | None:
    """The smallest pixel-aligned xyxy box holding every pixel with coverage > 0."""
    ys, xs = np.nonzero(coverage)
    if len(xs) == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def _disjoint(box: tuple[int, ...], others: list[tuple[int, ...]]) -> bool:
    return all(box[2] <= o[0] or o[2] <= box[0] or box[3] <= o[1] or o[3] <= box[1]
               for o in others)


def render_scene(image_size: int, rng: np.random.Generator) -> dict:
    """One scene: ``{"image": PIL RGB, "boxes": int64 (K, 4) xyxy, "labels": (K,) 1-based
    over SCENE_CLASSES, "coverage": uint8 (K, H, W) per-object pixel coverage}``."""
    ss = _shapes.SUPERSAMPLE
    n = image_size * ss
    canvas = Image.fromarray(_shapes._background(rng, n).astype(np.uint8))
    _shapes._clutter(ImageDraw.Draw(canvas), rng, n)
    count = int(rng.integers(OBJECTS[0], OBJECTS[1] + 1))
    classes = rng.choice(len(SCENE_CLASSES), size=count, replace=False)
    boxes, labels, coverages = [], [], []
    for class_id in classes:
        name = SCENE_CLASSES[int(class_id)]
        for _ in range(PLACEMENT_TRIES):
            radius = rng.uniform(*SCALE_RANGE) * n / 2
            theta = rng.uniform(-_shapes.MAX_ROTATION, _shapes.MAX_ROTATION)
            parts = _transformed(_shapes.SHAPES[name](), radius, theta)
            filled = np.concatenate([p for p, fill in parts if fill])
            low, high = filled.min(axis=0), filled.max(axis=0)
            # keep the whole outline at least one output pixel inside the image
            centre = rng.uniform(ss - low, n - ss - high)
            mask, coverage = _coverage(parts, centre, n, image_size)
            box = tight_box(coverage)
            if box is not None and _disjoint(box, boxes):
                break
        else:
            continue  # no free place for this object: the scene has one object fewer
        weights = np.asarray(mask, dtype=np.float64)[..., None] / 255.0
        bg_under = (np.asarray(canvas, dtype=np.float64) * weights).sum((0, 1)) / max(
            weights.sum(), 1.0)
        canvas.paste(Image.new("RGB", (n, n), _shapes._object_colour(rng, bg_under)), mask=mask)
        boxes.append(box)
        labels.append(int(class_id) + 1)
        coverages.append(coverage)
    return {
        "image": canvas.resize((image_size, image_size), Image.Resampling.BOX),
        "boxes": np.asarray(boxes, dtype=np.int64).reshape(-1, 4),
        "labels": np.asarray(labels, dtype=np.int64),
        "coverage": np.stack(coverages) if coverages else np.zeros((0, image_size, image_size),
                                                                   np.uint8),
    }


def scene_id(split: str, index: int) -> str:
    return f"{split}_{index:06d}"


def generate_scene(image_size: int, seed: int, split: str, index: int) -> dict:
    """Scene ``index`` of ``split``, as a VOC sample dict (plus its coverage masks)."""
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    scene = render_scene(image_size, rng)
    scene["image_id"] = scene_id(split, index)
    scene["difficult"] = np.zeros(len(scene["labels"]), dtype=bool)
    return scene


def _params(image_size: int, seed: int, n_trainval: int, n_test: int) -> dict:
    return {
        "generator": "scenes",
        "version": GENERATOR_VERSION,
        "image_size": image_size,
        "count": {"trainval": n_trainval, "test": n_test},
        "seed": seed,
        "classes": SCENE_CLASSES,
    }


def scenes_root(image_size: int = 128, seed: int = 0, n_trainval: int = 400, n_test: int = 200,
                cache_dir: str | Path | None = None) -> Path:
    """The cache folder of one parameter set, e.g. ``scenes-v1-128px-s0-n400-200``."""
    base = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return base / f"scenes-v{GENERATOR_VERSION}-{image_size}px-s{seed}-n{n_trainval}-{n_test}"


def generate_scenes(root: str | Path, image_size: int = 128, seed: int = 0,
                    n_trainval: int = 400, n_test: int = 200) -> Path:
    """Write the scenes as a VOC folder at ``root`` unless a finished one is there (written
    in a temporary sibling renamed into place; other parameters there are a DataError)."""
    if image_size < 16:
        raise ValueError(f"scenes: image_size must be at least 16, got {image_size}")
    counts = {"trainval": n_trainval, "test": n_test}

    def samples() -> Iterator[dict]:
        for split in SPLITS:
            for index in range(counts[split]):
                yield generate_scene(image_size, seed, split, index)

    splits = {split: [scene_id(split, i) for i in range(counts[split])] for split in SPLITS}

    def write(tmp: Path) -> None:
        write_voc(tmp, samples(), SCENE_CLASSES, splits)

    return write_once(root, _params(image_size, seed, n_trainval, n_test), "scenes", write)


def prepare_scenes(image_size: int = 128, seed: int = 0, n_trainval: int = 400,
                   n_test: int = 200, cache_dir: str | Path | None = None) -> Path:
    """Generate (once) into the cache and return the VOC root."""
    root = scenes_root(image_size, seed, n_trainval, n_test, cache_dir)
    return generate_scenes(root, image_size, seed, n_trainval, n_test)


def load_scenes(root: str | Path, split: str = "trainval") -> VOCDetection:
    """One split of a scenes folder, read as VOC with the shape classes."""
    return VOCDetection(root, split, classes=SCENE_CLASSES)
