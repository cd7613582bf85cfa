"""The ImageNet-C layout: ``root/<corruption>/<severity>/<class>/<image>``, read and written.

The layout the corrupted sets of hendrycks/robustness are released in (ImageNet-C, Tiny
ImageNet-C; ``ImageNet-C/create_c/make_imagenet_c.py`` writes
``<corruption>/<severity>/<wnid>/<file>``): each ``<corruption>/<severity>`` folder is an
ImageFolder whose classes are the clean set's. ``CorruptedSet`` reads it; ``write_corrupted``
writes a clean labelled data set corrupted by ``visionbench.data.images.corruptions`` into it (PNG),
which is how the embedded default is made and then read back by the same reader.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T
from tqdm.auto import tqdm

from visionbench.data.cache import write_once
from visionbench.data.datamodule import EVAL_CROP
from visionbench.data.images.corruptions import CORRUPTIONS, SEVERITIES, corrupt, image_rng
from visionbench.data.images.imagefolder import ImageFolderDataset, class_folders
from visionbench.errors import DataError

LAYOUT = "expected root/<corruption>/<severity 1-5>/<class>/<image> (the ImageNet-C layout)"


class CorruptedSet:
    """The corrupted copies under ``root``: ``dataset(corruption, severity)`` is an
    ``ImageFolderDataset`` whose classes are ``classes`` (default: those of the first folder,
    which every other folder must then hold)."""

    def __init__(self, root: str | Path, corruptions: list[str] | None = None,
                 severities: list[int] | None = None, classes: list[str] | None = None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"{self.root}: corrupted data folder not found ({LAYOUT})")
        found = {p.name: p for p in class_folders(self.root)}
        self.corruptions = list(corruptions) if corruptions is not None else [
            c for c in CORRUPTIONS if c in found]
        self.severities = list(severities) if severities is not None else list(SEVERITIES)
        if not self.corruptions:
            raise DataError(f"{self.root}: none of the corruptions {', '.join(CORRUPTIONS)} "
                            f"found ({LAYOUT})")
        for corruption in self.corruptions:
            if corruption not in found:
                raise DataError(f"{self.root / corruption}: corruption folder not found "
                                f"({LAYOUT})")
            for severity in self.severities:
                if not (found[corruption] / str(severity)).is_dir():
                    raise DataError(f"{found[corruption] / str(severity)}: severity folder not "
                                    f"found ({LAYOUT})")
        first = self.folder(self.corruptions[0], self.severities[0])
        self.classes = list(classes) if classes is not None else sorted(
            p.name for p in class_folders(first))

    def folder(self, corruption: str, severity: int) -> Path:
        return self.root / corruption / str(severity)

    def dataset(self, corruption: str, severity: int, mode: str | None = "RGB"
                ) -> ImageFolderDataset:
        """The images of one corruption at one severity, labelled by ``classes``."""
        return ImageFolderDataset(self.folder(corruption, severity), classes=self.classes,
                                  mode=mode)


def write_corrupted(images: Dataset, classes: list[str], out: Path, seed: int,
                    corruptions: tuple[str, ...] = CORRUPTIONS,
                    severities: tuple[int, ...] = SEVERITIES) -> None:
    """Write every ``(PIL image, label)`` of ``images`` corrupted by each corruption at each
    severity to ``out`` in the ImageNet-C layout (``<index>.png`` within its class); image
    ``i`` draws from ``image_rng(seed, corruption, severity, i)``."""
    total = len(images) * len(corruptions) * len(severities)
    with tqdm(total=total, desc="corrupted copies", leave=False) as bar:
        for corruption in corruptions:
            for severity in severities:
                folder = out / corruption / str(severity)
                for name in classes:
                    (folder / name).mkdir(parents=True, exist_ok=True)
                for index in range(len(images)):
                    img, label = images[index]
                    pixels = np.asarray(img.convert("RGB"), dtype=np.uint8)
                    rng = image_rng(seed, corruption, severity, index)
                    out_pixels = corrupt(pixels, corruption, severity, rng)
                    Image.fromarray(out_pixels).save(folder / classes[label] / f"{index:05d}.png")
                    bar.update()


class CenterCropped(Dataset):
    """``(PIL image, label)`` items resized and centre-cropped to ``size`` as ImageNet-C's
    source images were (``Resize(256)``, ``CenterCrop(224)``: the short side to
    ``size / 0.875``), here with the bicubic resize of visionbench's eval transform."""

    def __init__(self, images: Dataset, size: int) -> None:
        self.images, self.size = images, size
        self.crop = T.Compose([T.Resize(int(size / EVAL_CROP),
                                        interpolation=T.InterpolationMode.BICUBIC),
                               T.CenterCrop(size)])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        img, label = self.images[index]
        return self.crop(img), label


def prepare_corrupted(clean: str | Path, out: str | Path, seed: int,
                      corruptions: tuple[str, ...] = CORRUPTIONS,
                      severities: tuple[int, ...] = SEVERITIES,
                      crop_to: int | None = None) -> Path:
    """Write (once) the corrupted copies of the ImageFolder at ``clean`` into ``out``; with
    ``crop_to`` each image is first brought to the evaluation crop (``CenterCropped``), so
    the copies are scored as they are while the clean set goes through the eval transform."""
    clean = Path(clean)
    folder = ImageFolderDataset(clean)
    images = CenterCropped(folder, crop_to) if crop_to else folder
    params = {"generator": "corrupted", "source": str(clean), "images": len(images),
              "seed": seed, "corruptions": list(corruptions), "severities": list(severities),
              "crop_to": crop_to}

    def write(tmp: Path) -> None:
        write_corrupted(images, folder.classes, tmp, seed, corruptions, severities)

    return write_once(out, params, "corrupted", write)
