"""Reader for the IDX format of MNIST, Fashion-MNIST, KMNIST and EMNIST (raw or gzipped).

Format (http://yann.lecun.com/exdb/mnist/): a big-endian header ``0x00 0x00 <type> <ndim>``,
then ``ndim`` big-endian uint32 sizes, then the data in row-major order, big-endian.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from visionbench.errors import DataError

IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _read_bytes(path: Path) -> bytes:
    try:
        with path.open("rb") as fh:
            head = fh.read(2)
        if head == b"\x1f\x8b":
            with gzip.open(path, "rb") as fh:
                return fh.read()
        return path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: IDX file not found") from None
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"{path}: cannot read IDX file ({err})") from None


def read_idx(path: str | Path) -> np.ndarray:
    """The array stored in one IDX file (``.gz`` or raw), in native byte order."""
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPES:
        magic = raw[:4].hex() if raw else "empty file"
        raise DataError(
            f"{path}: not an IDX file (magic {magic}; expected 0000 08xx..0000 0exx, "
            "e.g. 00000803 for images, 00000801 for labels)"
        )
    dtype, ndim = IDX_DTYPES[raw[2]], raw[3]
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise DataError(f"{path}: truncated IDX header (expected {ndim} dimension sizes)")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    count = int(np.prod(shape, dtype=np.int64))
    expected = header_len + count * dtype.itemsize
    if len(raw) < expected:
        raise DataError(
            f"{path}: truncated IDX file ({len(raw)} bytes; the header {shape} says {expected})"
        )
    data = np.frombuffer(raw, dtype=dtype, count=count, offset=header_len).reshape(shape)
    return data.astype(dtype.newbyteorder("="))


class IDXDataset(Dataset):
    """Images and labels from a pair of IDX files; items are ``(image, label)``.

    Images are ``(N, H, W)`` uint8 arrays turned into PIL images of ``mode``; labels are
    ``(N,)`` integers in ``[0, num_classes)`` (``num_classes`` defaults to 10, MNIST-family).
    """

    def __init__(
        self,
        images_path: str | Path,
        labels_path: str | Path,
        num_classes: int | None = None,
        transform: Callable[[Image.Image], Any] | None = None,
        mode: str | None = "L",
    ) -> None:
        self.images_path, self.labels_path = Path(images_path), Path(labels_path)
        self.transform = transform
        self.mode = mode
        images, labels = read_idx(self.images_path), read_idx(self.labels_path)
        if images.ndim != 3 or images.dtype != np.uint8:
            raise DataError(
                f"{self.images_path}: images of shape {images.shape} and type {images.dtype} "
                "(expected (N, H, W) uint8)"
            )
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise DataError(
                f"{self.labels_path}: labels of shape {labels.shape} and type {labels.dtype} "
                "(expected (N,) integers)"
            )
        if len(images) != len(labels):
            raise DataError(
                f"{self.labels_path}: {len(labels)} labels for {len(images)} images "
                f"in {self.images_path} (expected one label per image)"
            )
        num_classes = 10 if num_classes is None else num_classes
        bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
        if bad.size:
            i = int(bad[0])
            raise DataError(
                f"{self.labels_path}: label {int(labels[i])} at index {i} is outside "
                f"[0, {num_classes}) ({bad.size} such labels)"
            )
        self.images = images
        self.targets = [int(y) for y in labels]
        self.classes = [str(i) for i in range(num_classes)]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        img = Image.fromarray(self.images[index])
        if self.mode and self.mode != "L":
            img = img.convert(self.mode)
        return (self.transform(img) if self.transform else img), self.targets[index]
