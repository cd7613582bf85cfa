"""Readers of real on-disk data formats, splits, transforms and the datamodule."""

from visionbench.data.datamodule import (
    ImageClassificationDataModule,
    LabelledSubset,
    Splits,
    TransformedDataset,
    build_transform,
    carve_indices,
    detect_format,
    load_splits,
)
from visionbench.data.idx import IDXDataset, read_idx
from visionbench.data.imagefolder import IMAGE_EXTENSIONS, ImageFolderDataset, load_image
from visionbench.data.synth import (
    SHAPES_CLASSES,
    default_cache_dir,
    generate_shapes,
    prepare_shapes,
    shapes_root,
)

__all__ = [
    "IMAGE_EXTENSIONS",
    "SHAPES_CLASSES",
    "IDXDataset",
    "ImageClassificationDataModule",
    "ImageFolderDataset",
    "LabelledSubset",
    "Splits",
    "TransformedDataset",
    "build_transform",
    "carve_indices",
    "default_cache_dir",
    "detect_format",
    "generate_shapes",
    "load_image",
    "load_splits",
    "prepare_shapes",
    "read_idx",
    "shapes_root",
]
