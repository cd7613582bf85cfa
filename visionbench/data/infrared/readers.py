"""Readers for infrared semantic segmentation: SODA, MFNet (thermal) and SCUT-Seg; InfMix.

Layouts, class lists and splits follow UNIP's official segmentation code (casiatao/UNIP,
``UNIP_segmentation/dataset/{soda,mfnet,scut_seg}.py`` and
``UNIP_segmentation/configs/_base_/datasets/{soda,mfnet,scut_seg}.py``, mmseg 0.11
``CustomDataset`` semantics): a split file lists one image stem per line, the image is
``<img_dir>/<stem><img_suffix>`` and its mask ``<ann_dir>/<stem>.png``, a single-channel PNG
of class indices (``reduce_zero_label=False``, index 0 is a real class) where 255 is ignored.

- SODA: ``JPEGImages/*.jpg``, ``SegmentationClassPNG/*.png``, ``train_infrared.txt`` and
  ``test_infrared.txt`` (the official config evaluates val and test on the test list).
- MFNet: ``thermal_imgs/*.png`` (UNIP's copy with the thermal channel alone) or the original
  release's ``images/*.png`` (4-channel RGB-T; channel 4 is thermal), ``labels/*.png``,
  ``train.txt``; val is ``val_test.txt`` (else ``val.txt``), test is ``test.txt``.
- SCUT-Seg: ``images/*.jpg``, ``labels/*.png``, ``train.txt``; val and test are ``val.txt``.

Every image comes back as 8-bit grey replicated to 3 channels ("RGB" with equal channels).
``InfMixDataset`` follows ``UNIP_pretraining/util/infmix.py``: infrared images plus RGB
images turned grey (``convert("L").convert("RGB")``), image only. ``INFRARED_MEAN`` and
``INFRARED_STD`` are the pretraining ``Normalize`` of ``UNIP_pretraining/main_pretrain.py``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from visionbench.data.images.imagefolder import (
    IMAGE_EXTENSIONS,
    ImageFolderDataset,
    image_files,
    load_image,
)
from visionbench.errors import DataError

# Pretraining normalization (main_pretrain.py: Normalize(mean=[0.3801]*3, std=[0.1871]*3)).
INFRARED_MEAN = 0.3801
INFRARED_STD = 0.1871
# The segmentation configs' img_norm_cfg: mean 96.9255, std 47.8976 on the 0-255 scale.
SEGMENTATION_MEAN = 96.9255 / 255.0
SEGMENTATION_STD = 47.8976 / 255.0
IGNORE_INDEX = 255

SODA_CLASSES: list[str] = [
    "_background_", "person", "building", "tree", "road", "pole", "grass", "door", "table",
    "chair", "car", "bicycle", "lamp", "monitor", "trafficCone", "trash can", "animal",
    "fence", "sky", "river", "sidewalk",
]  # fmt: skip
MFNET_CLASSES: list[str] = [
    "_background_", "car", "person", "bike", "curve", "car_stop", "guardrail", "color_cone",
    "bump",
]  # fmt: skip
SCUT_SEG_CLASSES: list[str] = [
    "background", "road", "person", "rider", "car", "truck", "fence", "tree", "bus", "pole",
]  # fmt: skip

MASK_EXTENSION = ".png"
MASK_MODES = ("L", "P", "I", "I;16", "I;16L", "I;16B")

# A joint transform maps (image "RGB", mask "L") to (image, mask): geometric changes must be
# applied to both. The mask it returns may be a PIL image, an array or a tensor.
JointTransform = Callable[[Image.Image, Image.Image], tuple[Any, Any]]


# ----------------------------------------------------------------------------- helpers


def to_grey3(img: Image.Image) -> Image.Image:
    """Any 8-bit image as grey replicated to 3 equal channels ("RGB")."""
    if img.mode != "L":
        img = img.convert("RGB").convert("L")
    return img.convert("RGB")


def mask_tensor(mask: Any) -> torch.Tensor:
    """A mask (PIL, array or tensor; ``HxW`` or ``1xHxW``) as an ``HxW`` LongTensor."""
    if not torch.is_tensor(mask):
        mask = torch.from_numpy(np.array(mask, dtype=np.int64))  # a copy: writable, strided
    if mask.ndim == 3 and mask.shape[0] == 1:
        mask = mask[0]
    return mask.long()


def _listing(folder: Path) -> dict[str, str]:
    """Stem -> file name of the image files directly in ``folder`` (first extension wins in
    the order of ``IMAGE_EXTENSIONS``)."""
    found: dict[str, str] = {}
    rank = {ext: i for i, ext in enumerate(IMAGE_EXTENSIONS)}
    with os.scandir(folder) as entries:
        names = [e.name for e in entries if e.is_file()]
    for name in sorted(names, key=lambda n: rank.get(os.path.splitext(n)[1].lower(), 99)):
        stem, ext = os.path.splitext(name)
        if ext.lower() in rank:
            found.setdefault(stem, name)
    return found


def read_split_file(path: Path) -> list[str]:
    """The image stems listed in a split file, one per line (an image extension is dropped)."""
    if not path.is_file():
        raise DataError(f"{path}: split file not found")
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read split file ({err})") from None
    stems = []
    for line in lines:
        name = line.strip()
        if not name:
            continue
        stem, ext = os.path.splitext(name)
        stems.append(stem if ext.lower() in IMAGE_EXTENSIONS else name)
    if not stems:
        raise DataError(f"{path}: split file lists no images (expected one image name a line)")
    return stems


# ----------------------------------------------------------------------------- readers


class SegmentationDataset(Dataset):
    """Base of the three readers: ``samples`` are ``(image path, mask path)`` pairs.

    Items are ``joint_transform(image, mask)`` with the mask made an ``HxW`` LongTensor, or
    ``(PIL "RGB" image, LongTensor mask)`` without a transform. Mask values are class indices
    below ``num_classes`` or ``ignore_index`` (255); anything else is a ``DataError``.
    """

    name = "segmentation"
    classes: list[str] = []
    image_folders: tuple[str, ...] = ()
    mask_folder = ""
    split_files: dict[str, tuple[str, ...]] = {}
    ignore_index = IGNORE_INDEX

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        joint_transform: JointTransform | None = None,
    ) -> None:
        self.root = Path(root)
        self.split = split
        self.joint_transform = joint_transform
        self.classes = list(type(self).classes)
        if not self.root.is_dir():
            raise DataError(f"{self.root}: {self.name} folder not found ({self.layout()})")
        self.image_dir = self._image_dir()
        self.mask_dir = self.root / self.mask_folder
        if not self.mask_dir.is_dir():
            raise DataError(f"{self.mask_dir}: mask folder not found ({self.layout()})")
        self.split_file = self._split_file(split)
        self.names = read_split_file(self.split_file)
        self.samples = self._pair(self.names)

    @classmethod
    def layout(cls) -> str:
        splits = ", ".join(f"{k}: {' or '.join(v)}" for k, v in cls.split_files.items())
        return (
            f"expected {' or '.join(f + '/' for f in cls.image_folders)}, "
            f"{cls.mask_folder}/ and split files ({splits})"
        )

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def _image_dir(self) -> Path:
        for folder in self.image_folders:
            if (self.root / folder).is_dir():
                return self.root / folder
        raise DataError(
            f"{self.root / self.image_folders[0]}: image folder not found ({self.layout()})"
        )

    def _split_file(self, split: str) -> Path:
        if split.endswith(".txt"):
            return self.root / split
        if split not in self.split_files:
            raise DataError(
                f"{self.root}: unknown split {split!r} for {self.name} "
                f"(expected one of {sorted(self.split_files)} or a .txt file name)"
            )
        candidates = [self.root / name for name in self.split_files[split]]
        return next((p for p in candidates if p.is_file()), candidates[0])

    def _pair(self, stems: list[str]) -> list[tuple[str, str]]:
        images, masks = _listing(self.image_dir), _listing(self.mask_dir)
        samples = []
        for stem in stems:
            if stem not in images:
                raise DataError(
                    f"{self.image_dir / stem}: image listed in {self.split_file.name} not found "
                    f"(expected {stem} with one of {', '.join(IMAGE_EXTENSIONS)})"
                )
            mask_name = stem + MASK_EXTENSION
            if masks.get(stem) != mask_name:
                raise DataError(
                    f"{self.mask_dir / mask_name}: mask not found for image "
                    f"{self.image_dir / images[stem]}"
                )
            samples.append((str(self.image_dir / images[stem]), str(self.mask_dir / mask_name)))
        return samples

    def __len__(self) -> int:
        return len(self.samples)

    def load_image(self, index: int) -> Image.Image:
        """Image ``index`` as 8-bit grey replicated to 3 channels."""
        return to_grey3(load_image(self.samples[index][0], mode=None))

    def load_mask(self, index: int) -> np.ndarray:
        """Mask ``index`` as a uint8 ``HxW`` array of class indices and ``ignore_index``."""
        path = self.samples[index][1]
        mask = load_image(path, mode=None)
        if mask.mode not in MASK_MODES:
            raise DataError(
                f"{path}: mask has mode {mask.mode} (expected a single-channel PNG of class "
                f"indices, mode L or P)"
            )
        values = np.asarray(mask)
        bad = ((values >= self.num_classes) & (values != self.ignore_index)) | (values < 0)
        if bad.any():
            wrong = sorted({int(v) for v in np.unique(values[bad])})[:5]
            raise DataError(
                f"{path}: mask values {wrong} outside the {self.num_classes} classes of "
                f"{self.name} (expected 0-{self.num_classes - 1} or {self.ignore_index})"
            )
        return values.astype(np.uint8)

    def __getitem__(self, index: int) -> tuple[Any, torch.Tensor]:
        img = self.load_image(index)
        mask = Image.fromarray(self.load_mask(index))
        if mask.size != img.size:
            raise DataError(
                f"{self.samples[index][1]}: mask is {mask.size[0]}x{mask.size[1]} but its "
                f"image is {img.size[0]}x{img.size[1]}"
            )
        if self.joint_transform is not None:
            img, mask = self.joint_transform(img, mask)
        return img, mask_tensor(mask)


class SODADataset(SegmentationDataset):
    """SODA's infrared segmentation part (``InfraredSemanticLabel/``), 21 classes."""

    name = "SODA"
    classes = SODA_CLASSES
    image_folders = ("JPEGImages",)
    mask_folder = "SegmentationClassPNG"
    split_files = {
        "train": ("train_infrared.txt",),
        "val": ("test_infrared.txt",),
        "test": ("test_infrared.txt",),
    }


class MFNetDataset(SegmentationDataset):
    """MFNet's thermal images, 9 classes: ``thermal_imgs/`` or 4-channel ``images/``."""

    name = "MFNet"
    classes = MFNET_CLASSES
    image_folders = ("thermal_imgs", "images")
    mask_folder = "labels"
    split_files = {
        "train": ("train.txt",),
        "val": ("val_test.txt", "val.txt"),
        "test": ("test.txt",),
    }

    def load_image(self, index: int) -> Image.Image:
        path = self.samples[index][0]
        img = load_image(path, mode=None)
        if Path(path).parent.name == "images":  # the RGB-T release: R, G, B, thermal
            if len(img.getbands()) != 4:
                raise DataError(
                    f"{path}: MFNet image has {len(img.getbands())} channels (expected a "
                    "4-channel RGB-T PNG whose 4th channel is thermal)"
                )
            img = img.getchannel(3)
        return to_grey3(img)


class SCUTSegDataset(SegmentationDataset):
    """SCUT-Seg, 10 classes; the official config tests on ``val.txt``."""

    name = "SCUT-Seg"
    classes = SCUT_SEG_CLASSES
    image_folders = ("images",)
    mask_folder = "labels"
    split_files = {"train": ("train.txt",), "val": ("val.txt",), "test": ("val.txt",)}


SEGMENTATION_READERS: dict[str, type[SegmentationDataset]] = {
    "soda": SODADataset,
    "mfnet": MFNetDataset,
    "scut-seg": SCUTSegDataset,
}
SEGMENTATION_CLASSES: dict[str, list[str]] = {
    name: list(reader.classes) for name, reader in SEGMENTATION_READERS.items()
}


def detect_segmentation_format(root: str | Path) -> str:
    """``"soda"``, ``"mfnet"`` or ``"scut-seg"``: which layout the folder at ``root`` has."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: data folder not found")
    if (root / "JPEGImages").is_dir() and (root / "SegmentationClassPNG").is_dir():
        return "soda"
    if (root / "labels").is_dir():
        if (root / "thermal_imgs").is_dir():
            return "mfnet"
        if (root / "images").is_dir():
            if (root / "test.txt").is_file() or (root / "val_test.txt").is_file():
                return "mfnet"
            if (root / "val.txt").is_file():
                return "scut-seg"
    layouts = "; ".join(f"{k}: {r.layout()}" for k, r in SEGMENTATION_READERS.items())
    raise DataError(f"{root}: unknown infrared segmentation layout ({layouts})")


def read_segmentation_dataset(
    root: str | Path,
    split: str = "train",
    joint_transform: JointTransform | None = None,
    format: str | None = None,
) -> SegmentationDataset:
    """The reader of the layout at ``root`` (detected unless ``format`` names it)."""
    fmt = format or detect_segmentation_format(root)
    if fmt not in SEGMENTATION_READERS:
        raise DataError(
            f"{root}: unknown segmentation format {fmt!r} (expected one of "
            f"{sorted(SEGMENTATION_READERS)})"
        )
    return SEGMENTATION_READERS[fmt](root, split, joint_transform)


# ----------------------------------------------------------------------------- transforms


def _uniform(lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand(()))


def _coin() -> bool:
    return bool(torch.randint(0, 2, ()))


def photometric_distortion(img: np.ndarray, brightness_delta: float = 32,
                           contrast_range: tuple[float, float] = (0.5, 1.5),
                           saturation_range: tuple[float, float] = (0.5, 1.5),
                           hue_delta: float = 18) -> np.ndarray:
    """mmseg 0.11 ``PhotoMetricDistortion`` on an ``HxWx3`` uint8 image (defaults as there).

    Each step with probability 1/2: brightness ``+ U(-32, 32)``; then, contrast ``x U(0.5,
    1.5)`` either first or last (a coin), saturation ``x U(0.5, 1.5)`` and hue ``+ U(-18, 18)``
    (OpenCV's 0-180 hue scale) in HSV. Each step clips to [0, 255] and rounds down to uint8, as
    ``convert`` there. The HSV conversion is PIL's (hue on 0-255) instead of OpenCV's; on the
    grey infrared images saturation and hue change nothing in either.
    """
    def convert(x: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
        return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)

    if _coin():
        img = convert(img, beta=_uniform(-brightness_delta, brightness_delta))
    contrast_first = _coin()
    if contrast_first and _coin():
        img = convert(img, alpha=_uniform(*contrast_range))
    if _coin():
        hsv = np.array(Image.fromarray(img).convert("HSV"))
        hsv[..., 1] = convert(hsv[..., 1], alpha=_uniform(*saturation_range))
        img = np.array(Image.fromarray(hsv, "HSV").convert("RGB"))
    if _coin():
        hsv = np.array(Image.fromarray(img).convert("HSV")).astype(np.int64)
        shift = _uniform(-hue_delta, hue_delta) * 256 / 180
        hsv[..., 0] = (hsv[..., 0] + int(shift)) % 256
        img = np.array(Image.fromarray(hsv.astype(np.uint8), "HSV").convert("RGB"))
    if not contrast_first and _coin():
        img = convert(img, alpha=_uniform(*contrast_range))
    return img


class SegmentationTransform:
    """A joint transform: (PIL image, PIL mask) -> (normalized 3xHxW float, HxW long).

    Train, as the official train pipeline (mmseg 0.11: ``Resize(img_scale=(4 size, size),
    ratio_range=(0.5, 2.0))``, ``RandomCrop(cat_max_ratio=0.75)``, ``RandomFlip(0.5)``,
    ``PhotoMetricDistortion``, ``Normalize``, ``Pad``): the image rescaled, keeping its aspect,
    so that its short side is ``size`` (its long side at most ``4 size``) times a ratio drawn
    from ``ratio_range``; a random ``size x size`` crop, redrawn up to 10 times while one class
    covers ``cat_max_ratio`` or more of its labelled pixels (or it holds one class only);
    horizontal flip; the photometric distortion; normalization; padding (image 0, mask 255).

    Eval: the image rescaled the same way without the ratio (``Resize(keep_ratio=True)``).
    With ``original_mask=True`` the mask keeps its original size, so predictions are scored at
    the label's own resolution (mmseg's ``rescale=True`` resizes the logits back to
    ``ori_shape``); else it is resized with the image. Images are resized bilinearly, masks by
    nearest neighbour. Randomness comes from ``torch``'s generator (DataLoader workers seeded
    as usual).
    """

    def __init__(
        self,
        size: int | None = None,
        train: bool = False,
        mean: float = INFRARED_MEAN,
        std: float = INFRARED_STD,
        ratio_range: tuple[float, float] = (0.5, 2.0),
        cat_max_ratio: float = 1.0,
        photometric: bool = False,
        original_mask: bool = False,
    ) -> None:
        if train and size is None:
            raise ValueError("a train SegmentationTransform needs a crop size")
        self.size, self.train, self.mean, self.std = size, train, mean, std
        self.ratio_range, self.cat_max_ratio = ratio_range, cat_max_ratio
        self.photometric, self.original_mask = photometric, original_mask

    def _resize(self, img: Image.Image, mask: Image.Image | None, short: float):
        w, h = img.size
        scale = min(short / min(w, h), 4 * short / max(w, h))
        new = (max(1, int(w * scale + 0.5)), max(1, int(h * scale + 0.5)))
        if new == img.size:
            return img, mask
        resized = None if mask is None else mask.resize(new, Image.Resampling.NEAREST)
        return img.resize(new, Image.Resampling.BILINEAR), resized

    def __call__(self, img: Image.Image, mask: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        if self.train:
            img, mask = self._resize(img, mask, self.size * _uniform(*self.ratio_range))
        elif self.size is not None:
            img, resized = self._resize(img, None if self.original_mask else mask, self.size)
            mask = mask if self.original_mask else resized
        pixels = np.array(img.convert("RGB"), dtype=np.uint8)
        labels = np.array(mask, dtype=np.int64)
        if self.train:
            pixels, labels = self._crop(pixels, labels)
            if _coin():
                pixels, labels = pixels[:, ::-1], labels[:, ::-1]
            if self.photometric:
                pixels = photometric_distortion(np.ascontiguousarray(pixels))
        x = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32) / 255.0)
        x = (x.permute(2, 0, 1) - self.mean) / self.std
        y = torch.from_numpy(np.ascontiguousarray(labels))
        if self.train:
            x, y = self._pad(x, y)
        return x.contiguous(), y.contiguous()

    def _crop_box(self, h: int, w: int) -> tuple[int, int]:
        s = self.size
        top = int(torch.randint(0, max(h - s, 0) + 1, ()))
        left = int(torch.randint(0, max(w - s, 0) + 1, ()))
        return top, left

    def _crop(self, pixels: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """mmseg's ``RandomCrop``: with ``cat_max_ratio < 1``, up to 10 boxes are tried for one
        where no class covers that share of the labelled pixels; else the last drawn is kept."""
        s = self.size
        top, left = self._crop_box(*labels.shape)
        if self.cat_max_ratio < 1.0:
            for _ in range(10):
                window = labels[top:top + s, left:left + s]
                _, counts = np.unique(window[window != IGNORE_INDEX], return_counts=True)
                if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                    break
                top, left = self._crop_box(*labels.shape)
        return pixels[top:top + s, left:left + s], labels[top:top + s, left:left + s]

    def _pad(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """To ``size x size``: image 0 (after normalization, as the official Pad), mask
        ``IGNORE_INDEX``."""
        s = self.size
        x_out = torch.zeros(3, s, s)
        y_out = torch.full((s, s), IGNORE_INDEX, dtype=torch.long)
        x_out[:, : x.shape[1], : x.shape[2]] = x
        y_out[: y.shape[0], : y.shape[1]] = y
        return x_out, y_out

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(size={self.size}, train={self.train}, mean={self.mean}, "
            f"std={self.std}, cat_max_ratio={self.cat_max_ratio}, "
            f"photometric={self.photometric}, original_mask={self.original_mask})"
        )


# ----------------------------------------------------------------------------- InfMix


class InfMixDataset(Dataset):
    """Unlabelled pretraining images from several sources, concatenated (UNIP's InfMix).

    A source is an infrared reader above (its images; masks unused), a folder of infrared
    images (InfMix's ``<data set>/thermal/``), or an ``ImageFolderDataset`` of RGB images,
    which are turned grey (``convert("L").convert("RGB")``, as ``rgb_gray=True``). Items are
    ``transform(image)``, or the grey "RGB" PIL image without a transform.
    """

    def __init__(
        self,
        sources: Sequence[SegmentationDataset | ImageFolderDataset | str | Path],
        transform: Callable[[Image.Image], Any] | None = None,
    ) -> None:
        self.transform = transform
        self.sources: list[SegmentationDataset | ImageFolderDataset | list[Path]] = []
        self.infrared: list[bool] = []
        for source in sources:
            if isinstance(source, (str, Path)):
                folder = Path(source)
                if not folder.is_dir():
                    raise DataError(f"{folder}: InfMix image folder not found")
                files = image_files(folder)
                if not files:
                    raise DataError(
                        f"{folder}: InfMix folder holds no images "
                        f"(expected files ending in {', '.join(IMAGE_EXTENSIONS)})"
                    )
                self.sources.append(files)
                self.infrared.append(True)
            elif isinstance(source, SegmentationDataset):
                self.sources.append(source)
                self.infrared.append(True)
            elif isinstance(source, ImageFolderDataset):
                self.sources.append(source)
                self.infrared.append(False)
            else:
                raise DataError(
                    f"InfMix source {type(source).__name__} not supported (expected an "
                    "infrared reader, an image folder path or an ImageFolderDataset)"
                )
        self.lengths = [len(s) for s in self.sources]
        self.offsets = np.cumsum([0, *self.lengths])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def locate(self, index: int) -> tuple[int, int]:
        """(source number, index within that source) of item ``index``."""
        if not 0 <= index < len(self):
            raise IndexError(index)
        source = int(np.searchsorted(self.offsets, index, side="right") - 1)
        return source, index - int(self.offsets[source])

    def load_image(self, index: int) -> Image.Image:
        source_id, local = self.locate(index)
        source = self.sources[source_id]
        if isinstance(source, list):
            return to_grey3(load_image(source[local], mode=None))
        if isinstance(source, SegmentationDataset):
            return source.load_image(local)
        return to_grey3(load_image(source.samples[local][0], mode="RGB"))

    def __getitem__(self, index: int) -> Any:
        img = self.load_image(index)
        return self.transform(img) if self.transform else img
