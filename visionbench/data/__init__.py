"""Data: one folder per modality (``images/``, ``infrared/``, ...), each with readers of the
real on-disk formats and a generator that writes its embedded default in one of them; one
generic datamodule of dict batches over any reader (``datamodule``); the shared cache.
"""

from visionbench.data.cache import default_cache_dir
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
from visionbench.data.images import (
    IMAGE_EXTENSIONS,
    SHAPES_CLASSES,
    IDXDataset,
    ImageFolderDataset,
    generate_shapes,
    load_image,
    prepare_shapes,
    read_idx,
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
