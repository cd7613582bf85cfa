"""Reader for the ImageFolder layout: ``root/<class>/<image file>``.

The layout of torchvision's ``ImageFolder`` (and of ImageNet's train/val folders once
prepared). Every unreadable or misplaced file becomes a one-line ``DataError`` naming it.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image, ImageFile
from torch.utils.data import Dataset

from visionbench.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
# What PIL raises on a corrupt, truncated or hostile file.
IMAGE_READ_ERRORS = (
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    struct.error,
    Image.DecompressionBombError,
)


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def image_files(folder: Path) -> list[Path]:
    """The image files directly in ``folder``, sorted by name (one ``scandir``, no stats)."""
    with os.scandir(folder) as entries:
        names = [
            e.name
            for e in entries
            if e.is_file() and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS
        ]
    return [folder / name for name in sorted(names)]


def class_folders(root: Path) -> list[Path]:
    """Subfolders of ``root`` that are not hidden, sorted by name."""
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def load_image(path: str | Path, mode: str | None = "RGB") -> Image.Image:
    """Open, fully decode and convert one image; any decoding failure is a ``DataError``.

    ``mode=None`` keeps the mode as stored (e.g. ``I;16`` for 16-bit thermal images).
    """
    # A truncated file must fail here rather than come back padded with grey.
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert(mode) if mode else img.copy()
    except IMAGE_READ_ERRORS as err:
        reason = str(err).replace("\n", " ") or type(err).__name__
        raise DataError(f"{path}: cannot read image ({reason})") from None


class ImageFolderDataset(Dataset):
    """Images under ``root/<class>/``, labelled by the index of their folder in ``classes``.

    ``classes`` defaults to the sorted subfolder names; when given, every subfolder must be
    one of them. Images are converted to ``mode`` ("RGB", "L"; None keeps the stored mode).
    Items are ``(transform(image), label)``, or ``(PIL image, label)`` without a transform.
    """

    def __init__(
        self,
        root: str | Path,
        classes: list[str] | None = None,
        transform: Callable[[Image.Image], Any] | None = None,
        mode: str | None = "RGB",
    ) -> None:
        self.root = Path(root)
        self.transform = transform
        self.mode = mode
        if not self.root.is_dir():
            raise DataError(f"{self.root}: image folder not found (expected root/<class>/<image>)")
        folders = class_folders(self.root)
        if not folders:
            raise DataError(
                f"{self.root}: no class subfolders (expected root/<class>/<image files>)"
            )
        self.classes = sorted(f.name for f in folders) if classes is None else list(classes)
        class_to_idx = {name: i for i, name in enumerate(self.classes)}
        self.samples: list[tuple[str, int]] = []
        for folder in folders:
            if folder.name not in class_to_idx:
                raise DataError(
                    f"{folder}: label outside the class list (expected one of {self.classes})"
                )
            files = image_files(folder)
            if not files:
                raise DataError(
                    f"{folder}: class folder holds no images "
                    f"(expected files ending in {', '.join(IMAGE_EXTENSIONS)})"
                )
            label = class_to_idx[folder.name]
            self.samples.extend((str(p), label) for p in files)
        self.targets = [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, label = self.samples[index]
        img = load_image(path, self.mode)
        return (self.transform(img) if self.transform else img), label
