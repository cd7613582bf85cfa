"""Procedural generators for the embedded default data sets, written in real on-disk formats."""

from visionbench.data.synth.cache import default_cache_dir
from visionbench.data.synth.shapes import (
    SHAPES_CLASSES,
    generate_shapes,
    prepare_shapes,
    shapes_root,
)

__all__ = [
    "SHAPES_CLASSES",
    "default_cache_dir",
    "generate_shapes",
    "prepare_shapes",
    "shapes_root",
]
