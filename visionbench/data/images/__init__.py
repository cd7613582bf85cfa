"""Images: readers of the on-disk formats (ImageFolder, MNIST IDX, ImageNet-C, Pascal VOC) and
the embedded generators that write those formats (``shapes``, its corrupted copies, and
multi-object scenes), read back by the same readers."""

from visionbench.data.images.idx import IDXDataset, read_idx
from visionbench.data.images.imagefolder import IMAGE_EXTENSIONS, ImageFolderDataset, load_image
from visionbench.data.images.shapes import (
    SHAPES_CLASSES,
    generate_shapes,
    prepare_shapes,
    shapes_root,
)

__all__ = [
    "IMAGE_EXTENSIONS",
    "SHAPES_CLASSES",
    "IDXDataset",
    "ImageFolderDataset",
    "generate_shapes",
    "load_image",
    "prepare_shapes",
    "read_idx",
    "shapes_root",
]
