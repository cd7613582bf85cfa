"""Format detection, train/val/test splits, transforms and the image-classification datamodule.

Readers (``imagefolder.py``, ``idx.py``) know one on-disk format each; this module decides
which one a folder holds, carves the splits a folder does not provide, and wraps them in a
``LightningDataModule``. Train transforms follow facebookresearch/mae ``main_pretrain.py``
(kind "mae") and ``main_finetune.py`` (kind "finetune", without RandAugment / mixup).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import transforms as T

from visionbench.backbones.sealed import InputSpec
from visionbench.data.batch import sample_dict
from visionbench.data.images.idx import IDXDataset
from visionbench.data.images.imagefolder import ImageFolderDataset, class_folders, is_image_file
from visionbench.data.transforms import ImageSample
from visionbench.distributed import world_size
from visionbench.errors import ConfigError, DataError

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
SPLIT_NAMES = ("train", "val", "test")
EXPECTED_LAYOUTS = (
    "expected an ImageFolder layout (root/train/<class>/<image>, optional root/val/ and "
    "root/test/, or root/<class>/<image>) or an MNIST IDX layout "
    "(root/train-images-idx3-ubyte[.gz] + root/train-labels-idx1-ubyte[.gz], "
    "optionally one folder down, e.g. root/raw/)"
)


# ----------------------------------------------------------------------------- detection


def _find_file(folder: Path, name: str) -> Path | None:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def find_idx_files(root: Path) -> dict[str, Path] | None:
    """The IDX files under ``root`` or one folder down; None without a train pair."""
    folders = [root] + class_folders(root)
    for folder in folders:
        found = {key: _find_file(folder, name) for key, name in IDX_FILES.items()}
        if found["train_images"] and found["train_labels"]:
            return {key: path for key, path in found.items() if path is not None}
    return None


def _holds_class_folders(folder: Path) -> bool:
    return any(any(is_image_file(f) for f in sub.iterdir()) for sub in class_folders(folder))


def detect_format(root: str | Path) -> str:
    """``"imagefolder"`` or ``"idx"``: the on-disk format of the data set at ``root``."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: data folder not found ({EXPECTED_LAYOUTS})")
    if (root / "train").is_dir() and _holds_class_folders(root / "train"):
        return "imagefolder"
    if find_idx_files(root) is not None:
        return "idx"
    if not (root / "train").is_dir() and _holds_class_folders(root):
        return "imagefolder"
    raise DataError(f"{root}: unknown data set layout ({EXPECTED_LAYOUTS})")


# ----------------------------------------------------------------------------- splits


class LabelledSubset(Subset):
    """A ``Subset`` that keeps ``targets`` and ``classes`` of its parent."""

    def __init__(self, dataset: Dataset, indices: Sequence[int]) -> None:
        super().__init__(dataset, list(indices))
        parent_targets = dataset.targets
        self.targets = [parent_targets[i] for i in self.indices]
        self.classes = list(dataset.classes)


@dataclass
class Splits:
    """The three splits of one data set; items of each are ``(PIL image, int label)``."""

    train: Dataset
    val: Dataset
    test: Dataset
    classes: list[str]
    format: str

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _largest_remainder(counts: np.ndarray, fraction: float) -> np.ndarray:
    """Per-class shares of ``round(counts.sum() * fraction)`` samples, proportional to counts."""
    exact = counts * fraction
    shares = np.floor(exact).astype(np.int64)
    missing = int(round(counts.sum() * fraction)) - int(shares.sum())
    order = np.argsort(-(exact - shares), kind="stable")
    shares[order[:missing]] += 1
    return shares


def carve_indices(targets: Sequence[int], fractions: Sequence[float], seed: int) -> list[list[int]]:
    """Stratified, seeded split of ``range(len(targets))``.

    Returns one sorted index list per fraction, then the rest (the remaining train part).
    Each part holds ``round(N * fraction)`` samples, spread over classes in proportion.
    """
    targets_arr = np.asarray(targets, dtype=np.int64)
    classes = np.unique(targets_arr)
    per_class = [np.flatnonzero(targets_arr == c) for c in classes]
    counts = np.array([len(ix) for ix in per_class])
    shares = [_largest_remainder(counts, f) for f in fractions]
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in range(len(fractions) + 1)]
    for c, indices in enumerate(per_class):
        shuffled = rng.permutation(indices)
        start = 0
        for p, share in enumerate(shares):
            take = min(int(share[c]), len(shuffled) - start)
            parts[p].extend(int(i) for i in shuffled[start : start + take])
            start += take
        parts[-1].extend(int(i) for i in shuffled[start:])
    return [sorted(part) for part in parts]


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"data.{name}: {value} (expected a fraction in [0, 1))")
    if val_fraction + test_fraction >= 1.0:
        raise ConfigError(
            f"data.val_fraction + data.test_fraction: {val_fraction + test_fraction} "
            "(expected below 1, leaving samples to train on)"
        )


def _carve(
    dataset: Dataset, fractions: Sequence[float], seed: int, where: Path
) -> list[LabelledSubset]:
    parts = carve_indices(dataset.targets, fractions, seed)
    if not parts[-1]:
        raise DataError(f"{where}: too few samples ({len(dataset)}) to carve val/test splits")
    return [LabelledSubset(dataset, ix) for ix in parts]


def _check_classes(split: Dataset, train_classes: list[str], where: Path) -> None:
    if list(split.classes) != list(train_classes):
        raise DataError(
            f"{where}: classes {split.classes} differ from the train classes {train_classes}"
        )


def _imagefolder_splits(
    root: Path, val_fraction: float, test_fraction: float, seed: int, mode: str | None
) -> Splits:
    if not (root / "train").is_dir():
        full = ImageFolderDataset(root, mode=mode)
        val, test, train = _carve(full, [val_fraction, test_fraction], seed, root)
        return Splits(train, val, test, list(full.classes), "imagefolder")

    train = ImageFolderDataset(root / "train", mode=mode)
    # Passing the train classes makes a val/test folder outside them a DataError.
    given = {
        name: ImageFolderDataset(root / name, classes=train.classes, mode=mode)
        for name in ("val", "test")
        if (root / name).is_dir()
    }
    val, test = given.get("val"), given.get("test")
    if val is not None and test is None:
        test = val  # ImageNet style: the public val folder is the test set
        val = None
    if val is None and test is None:
        val, test, train = _carve(train, [val_fraction, test_fraction], seed, root / "train")
    elif val is None:
        val, train = _carve(train, [val_fraction], seed, root / "train")
    return Splits(train, val, test, list(train.classes), "imagefolder")


def _idx_splits(
    root: Path,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    mode: str | None,
    num_classes: int | None,
) -> Splits:
    files = find_idx_files(root)
    if files is None:
        raise DataError(f"{root}: no IDX train files ({EXPECTED_LAYOUTS})")
    full = IDXDataset(files["train_images"], files["train_labels"], num_classes, mode=mode)
    if "test_images" in files and "test_labels" in files:
        test = IDXDataset(files["test_images"], files["test_labels"], num_classes, mode=mode)
        _check_classes(test, full.classes, files["test_labels"])
        val, train = _carve(full, [val_fraction], seed, files["train_images"])
    else:
        val, test, train = _carve(full, [val_fraction, test_fraction], seed, files["train_images"])
    return Splits(train, val, test, list(full.classes), "idx")


def load_splits(
    root: str | Path,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
    mode: str | None = "RGB",
    num_classes: int | None = None,
) -> Splits:
    """Train / val / test datasets of the data set at ``root``, in whichever format it is.

    Splits the folder provides are used as they are; missing ones are carved from train,
    stratified per class and deterministic for ``seed``: val (``val_fraction`` of train)
    when there is no val folder (with ``root/val`` only, that folder becomes the test set),
    and test (``test_fraction``) when there is neither. ``num_classes`` is for IDX files
    (default 10, MNIST-family; e.g. 47 for EMNIST balanced); the t10k files are the test
    set, carved from train only when they are absent.
    """
    root = Path(root)
    _check_fractions(val_fraction, test_fraction)
    fmt = detect_format(root)
    if fmt == "idx":
        return _idx_splits(root, val_fraction, test_fraction, seed, mode, num_classes)
    return _imagefolder_splits(root, val_fraction, test_fraction, seed, mode)


# ----------------------------------------------------------------------------- transforms


def _to_8bit(img: Image.Image) -> Image.Image:
    """A 16-bit / int32 / float image as 8-bit "L", keeping the full stored range."""
    arr = np.asarray(img, dtype=np.float64)
    if img.mode.startswith("I;16"):
        scaled = arr / 257.0
    elif img.mode == "F" and arr.size and 0.0 <= arr.min() and arr.max() <= 1.0:
        scaled = arr * 255.0
    elif img.mode == "I" and arr.size and 0 <= arr.min() and arr.max() <= 255:
        scaled = arr
    elif img.mode == "I" and arr.size and 0 <= arr.min() and arr.max() <= 65535:
        scaled = arr / 257.0
    else:
        lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 1.0)
        scaled = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8))


class ToChannels:
    """Any PIL image as 8-bit "L" (``in_chans`` 1), "RGB" (3), or one of L/RGB/RGBA (other
    counts, which ``AdaptChannels`` then truncates or replicates)."""

    def __init__(self, in_chans: int) -> None:
        self.in_chans = in_chans

    def __call__(self, img: Image.Image) -> Image.Image:
        if img.mode.startswith("I") or img.mode == "F":
            img = _to_8bit(img)
        if img.mode == "P":
            img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        if self.in_chans == 1:
            return img.convert("L")
        if self.in_chans == 3:
            return img.convert("RGB")
        if img.mode in ("L", "RGB", "RGBA"):
            return img
        return img.convert("L" if img.mode in ("1", "LA") else "RGB")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(in_chans={self.in_chans})"


class AdaptChannels:
    """A ``(C, H, W)`` tensor to ``in_chans`` channels: first ``in_chans`` if it has as many,
    else its grey level replicated."""

    def __init__(self, in_chans: int) -> None:
        self.in_chans = in_chans

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == self.in_chans:
            return x
        if x.shape[0] > self.in_chans:
            return x[: self.in_chans].contiguous()
        grey = x[:3].mean(dim=0, keepdim=True) if x.shape[0] >= 3 else x[:1]
        return grey.expand(self.in_chans, -1, -1).contiguous()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(in_chans={self.in_chans})"


def per_channel(values: Sequence[float], in_chans: int, name: str = "mean/std") -> list[float]:
    """One statistic per channel from ``in_chans``, one, or RGB values (averaged)."""
    values = [float(v) for v in values]
    if len(values) == in_chans:
        return values
    if len(values) == 3:  # RGB statistics for grey input (replicated to in_chans channels)
        return [sum(values) / 3.0] * in_chans
    if len(values) == 1:
        return values * in_chans
    raise ConfigError(
        f"data.{name}: {values} has {len(values)} values (expected {in_chans}, one per channel)"
    )


EVAL_CROP = 0.875  # main_finetune.py / main_linprobe.py: Resize(256) + CenterCrop(224)


def finetune_augmentation(image_size: int, mean: Sequence[float], std: Sequence[float],
                          auto_augment: str | None, reprob: float) -> tuple[list, list]:
    """The PIL and tensor parts of MAE's fine-tune transform (``util/datasets.py``
    ``build_transform``: timm's ``create_transform`` with RandomResizedCrop(0.08, 1) bicubic,
    flip, RandAugment ``auto_augment``, then normalize and RandomErasing(``reprob``, pixel
    mode, one box)). Returns ``(PIL ops, tensor ops after Normalize)``."""
    from timm.data import create_transform
    from timm.data.random_erasing import RandomErasing

    def rgb(values: Sequence[float]) -> tuple[float, ...]:  # RandAugment's fill colour
        values = [float(v) for v in values]
        return tuple(values) if len(values) == 3 else (sum(values) / len(values),) * 3

    try:
        primary, secondary, final = create_transform(
            image_size, is_training=True, color_jitter=None, auto_augment=auto_augment,
            interpolation="bicubic", re_prob=reprob, re_mode="pixel", re_count=1,
            mean=rgb(mean), std=rgb(std), separate=True)
    except (AssertionError, KeyError, ValueError) as err:
        raise ConfigError(f"eval.finetune.auto_augment: {auto_augment!r} is not a timm "
                          f"augmentation policy ({err})") from None
    erasing = [t for t in final.transforms if isinstance(t, RandomErasing)]
    for policy in secondary.transforms:
        zero_bit_posterize(policy)
    return list(primary.transforms) + list(secondary.transforms), erasing


def zero_bit_posterize(policy) -> None:
    """A timm augmentation policy's posterize ops made to take 0 bits (``_posterize``)."""
    from timm.data import auto_augment as timm_augment

    for op in getattr(policy, "ops", []):
        if op.aug_fn is timm_augment.posterize:
            op.aug_fn = _posterize


def _posterize(img: Image.Image, bits_to_keep: int, **kwargs) -> Image.Image:
    """timm's posterize; at 0 bits (``PosterizeIncreasing`` at the top magnitude) the black
    image Pillow gave before version 13, which refuses 0 bits."""
    from timm.data import auto_augment as timm_augment

    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return timm_augment.posterize(img, bits_to_keep, **kwargs)


def build_transform(
    image_size: int,
    in_chans: int,
    mean: Sequence[float],
    std: Sequence[float],
    train: bool,
    kind: str = "mae",
    auto_augment: str | None = None,
    reprob: float = 0.0,
    crop_scale: tuple[float, float] = (0.08, 1.0),
    eval_crop: float = EVAL_CROP,
    normalize: bool = True,
) -> Callable[[Image.Image], torch.Tensor]:
    """PIL image of any size and mode -> normalized ``(in_chans, image_size, image_size)``.

    Train ``kind="mae"``: RandomResizedCrop(scale=(0.2, 1.0), bicubic) + horizontal flip,
    as MAE pretraining; ``kind="finetune"``: MAE's fine-tune transform
    (``finetune_augmentation``: scale=(0.08, 1.0), RandAugment ``auto_augment`` when given,
    RandomErasing with probability ``reprob``), augmented in RGB; ``kind="supervised"``:
    RandomResizedCrop(scale=``crop_scale``, bicubic) + horizontal flip (torchvision's ResNet
    recipe with its default scale (0.08, 1)). Eval: bicubic resize of the
    short side to ``image_size / eval_crop`` + centre crop, as ``main_finetune.py`` and
    ``main_linprobe.py`` (``eval_crop`` 0.875: 256 -> 224; 1 for images that are the crop
    already). ``mean`` / ``std``: one value per channel, one for all,
    or RGB values (averaged when ``in_chans`` is not 3). ``normalize=False`` (eval only):
    the tensor in [0, 1], for an encoder with its normalization sealed in
    (``backbones.sealed``).
    """
    if in_chans < 1:
        raise ConfigError(f"model.in_chans: {in_chans} (expected a positive integer)")
    if train and not normalize:
        raise ValueError("build_transform: normalize=False is for eval transforms only")
    bicubic = T.InterpolationMode.BICUBIC
    after: list = []
    channels = in_chans
    if not train:
        spatial = [T.Resize(int(image_size / eval_crop), interpolation=bicubic),
                   T.CenterCrop(image_size)]
    elif kind in ("mae", "supervised"):
        scale = (0.2, 1.0) if kind == "mae" else tuple(crop_scale)
        spatial = [
            T.RandomResizedCrop(image_size, scale=scale, interpolation=bicubic),
            T.RandomHorizontalFlip(),
        ]
    elif kind == "finetune":
        channels = 3  # timm's RandAugment works on RGB; AdaptChannels brings in_chans back
        spatial, after = finetune_augmentation(image_size, mean, std, auto_augment, reprob)
    else:
        raise ConfigError(f"data.train_kind: {kind!r} (expected 'mae', 'finetune' or "
                          "'supervised')")
    return T.Compose(
        [
            ToChannels(channels),
            *spatial,
            T.ToTensor(),
            AdaptChannels(in_chans),
            *([T.Normalize(per_channel(mean, in_chans, "mean"),
                           per_channel(std, in_chans, "std"))] if normalize else []),
            *after,
        ]
    )


class TransformedDataset(Dataset):
    """``dataset`` as sample dicts: each item through ``transform``, a sample transform (an
    image transform lifted by ``ImageSample``); without one, ``{"image", "label"}``."""

    def __init__(self, dataset: Dataset, transform: Callable[[dict], dict] | None) -> None:
        self.dataset = dataset
        self.transform = transform

    @property
    def targets(self) -> list[int]:
        return list(self.dataset.targets)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        item = self.dataset[index]
        sample = sample_dict(item)
        return self.transform(sample) if self.transform else sample


# ----------------------------------------------------------------------------- datamodule


class LabelledDataModule(L.LightningDataModule):
    """What the labelled datamodules (images here, ``data/video``) share: the splits loaded
    once (``_load_splits``, a subclass's), the class-stratified ``label_fraction`` of the
    training split (``carve_indices`` with ``seed``; val and test whole), the classes, and
    loaders that drop the last incomplete training batch when each rank has a full one.
    Subclasses set ``label_fraction``, ``seed``, ``num_workers`` and ``splits = None``."""

    label_fraction: float
    seed: int
    num_workers: int
    splits: Splits | None
    worker_start: str | None = None  # the workers' multiprocessing start method; None: default

    def _load_splits(self) -> Splits:
        raise NotImplementedError(f"{type(self).__name__} loads its splits")

    def _source(self) -> str:
        """Where the data comes from, for messages."""
        return str(getattr(self, "root", type(self).__name__))

    def setup(self, stage: str | None = None) -> None:
        if self.splits is None:
            splits = self._load_splits()
            if self.label_fraction < 1.0:
                kept = carve_indices(splits.train.targets, [self.label_fraction], self.seed)[0]
                if not kept:
                    raise DataError(f"{self._source()}: a label fraction of "
                                    f"{self.label_fraction:g} keeps none of the "
                                    f"{len(splits.train)} training samples")
                splits.train = LabelledSubset(splits.train, kept)
            self.splits = splits

    def _loaded(self) -> Splits:
        self.setup()
        assert self.splits is not None
        return self.splits

    @property
    def classes(self) -> list[str]:
        return self._loaded().classes

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            # under DDP each rank's sampler holds len / world of them
            drop_last=shuffle and len(dataset) // world_size() >= batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            multiprocessing_context=self.worker_start if self.num_workers > 0 else None,
        )


class ImageClassificationDataModule(LabelledDataModule):
    """Train / val / test loaders over any supported format at ``root``.

    Images are read in their stored mode; ``build_transform`` brings them to ``in_chans``
    channels at ``image_size``. ``eval_dataloader`` gives unshuffled, eval-transformed
    loaders of any split, for frozen-feature extraction; with ``raw=True`` the images are
    not normalized, for an encoder sealed with ``input_spec`` (``data.mean`` / ``data.std``
    per channel). ``label_fraction`` < 1 keeps that class-stratified share of the training
    split (``carve_indices`` with ``seed``), val and test whole: the low-label protocol.
    """

    def __init__(
        self,
        root: str | Path,
        image_size: int,
        in_chans: int,
        mean: Sequence[float],
        std: Sequence[float],
        batch_size: int,
        num_workers: int = 0,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        seed: int = 0,
        train_kind: str = "mae",
        auto_augment: str | None = None,
        reprob: float = 0.0,
        crop_scale: tuple[float, float] = (0.08, 1.0),
        train_transform: Callable[[Any], dict] | None = None,
        label_fraction: float = 1.0,
    ) -> None:
        super().__init__()
        if not 0.0 < label_fraction <= 1.0:
            raise ConfigError(f"label fraction: {label_fraction} (expected a fraction in (0, 1])")
        self.label_fraction = label_fraction
        self.root = Path(root)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.seed = seed
        # a method's own sample transform, or the image transform of ``train_kind``
        self.train_transform = train_transform or ImageSample(build_transform(
            image_size, in_chans, mean, std, True, train_kind, auto_augment, reprob, crop_scale))
        self.eval_transform = ImageSample(build_transform(image_size, in_chans, mean, std, False))
        self.raw_eval_transform = ImageSample(build_transform(
            image_size, in_chans, mean, std, False, normalize=False))
        self.input_spec = InputSpec.of(per_channel(mean, in_chans, "mean"),
                                       per_channel(std, in_chans, "std"))
        self.splits: Splits | None = None

    def _load_splits(self) -> Splits:
        return load_splits(self.root, self.val_fraction, self.test_fraction, self.seed,
                           mode=None)

    def train_dataloader(self) -> DataLoader:
        train = TransformedDataset(self._loaded().train, self.train_transform)
        return self._loader(train, self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self.eval_dataloader("val")

    def test_dataloader(self) -> DataLoader:
        return self.eval_dataloader("test")

    def eval_dataloader(self, split: str, batch_size: int | None = None,
                        raw: bool = False) -> DataLoader:
        """Unshuffled loader of ``split`` ("train", "val" or "test") with the eval transform
        (``raw``: without its normalization)."""
        if split not in SPLIT_NAMES:
            raise ConfigError(f"split: {split!r} (expected one of {', '.join(SPLIT_NAMES)})")
        dataset = TransformedDataset(getattr(self._loaded(), split),
                                     self.raw_eval_transform if raw else self.eval_transform)
        return self._loader(dataset, batch_size or self.batch_size, shuffle=False)
