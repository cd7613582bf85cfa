"""The multispectral classification datamodule: train / val / test of EuroSAT-MS,
BigEarthNet-S2, So2Sat LCZ42 or a GeoTIFF folder (``readers``), as dict batches of raw
digital numbers: ``image`` float ``(B, C, H, W)`` (reflectance x 10000, the bands asked for,
missing ones zero) and ``label`` (int64 ``(B,)``, multi-hot ``(B, K)`` for BigEarthNet).

Inputs stay raw: a protocol or an encoder sealed with ``input_spec`` normalizes them (the
remote-sensing protocol compares normalizations, so none is baked in). Splits are the data
set's own (torchgeo's split files); where one is missing (So2Sat v3 has no validation split,
a GeoTIFF folder may list only ``train.csv``) it is carved from train, stratified and
seeded; ``label_fraction`` keeps that share of the training split (BigEarthNet: a seeded
random subset; ``train_subset(n)`` instead picks the training indices, e.g. a protocol's
official draw). ``in_memory`` decodes every sample once and keeps it (for small sets read
over many epochs: a BigEarthNet patch is 12 GeoTIFFs to decode and resample).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from torch.utils.data import DataLoader, Dataset

from visionbench.data.datamodule import (
    LabelledDataModule,
    LabelledSubset,
    Splits,
    TransformedDataset,
    _check_fractions,
    carve_indices,
)
from visionbench.data.multispectral.readers import (
    BigEarthNetS2,
    EuroSATMS,
    GeoTiffFolder,
    So2SatMSI,
)
from visionbench.errors import ConfigError, DataError

DATASETS = ("eurosat-ms", "bigearthnet", "so2sat", "geotiff")


class MultispectralDataModule(LabelledDataModule):
    def __init__(self, root: str | Path, dataset: str = "eurosat-ms",
                 bands: Sequence[str] | None = None, batch_size: int = 64,
                 num_workers: int = 0, seed: int = 0, label_fraction: float = 1.0,
                 val_fraction: float = 0.1, test_fraction: float = 0.1,
                 train_transform: Callable[[dict], dict] | None = None,
                 eval_transform: Callable[[dict], dict] | None = None,
                 so2sat_version: str = "3_random", multi_label_csv: bool = False,
                 in_memory: bool = False,
                 train_subset: Callable[[int], Sequence[int]] | None = None) -> None:
        super().__init__()
        if dataset not in DATASETS:
            raise ConfigError(f"multispectral data set {dataset!r} (expected one of "
                              f"{', '.join(DATASETS)})")
        if not 0.0 < label_fraction <= 1.0:
            raise ConfigError(f"label fraction: {label_fraction} (expected a fraction in (0, 1])")
        _check_fractions(val_fraction, test_fraction)
        self.root, self.dataset, self.bands = Path(root), dataset, bands
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.label_fraction = label_fraction
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.train_transform, self.eval_transform = train_transform, eval_transform
        self.so2sat_version, self.multi_label_csv = so2sat_version, multi_label_csv
        self.in_memory, self.train_subset = in_memory, train_subset
        self.splits: Splits | None = None

    @property
    def multi_label(self) -> bool:
        return self.dataset == "bigearthnet" or (self.dataset == "geotiff"
                                                  and self.multi_label_csv)

    def _read(self, split: str) -> Dataset | None:
        if self.dataset == "eurosat-ms":
            return EuroSATMS(self.root, split, self.bands)
        if self.dataset == "bigearthnet":
            return BigEarthNetS2(self.root, split, self.bands)
        if self.dataset == "so2sat":
            name = {"val": "validation"}.get(split, split)
            if self.so2sat_version != "2" and name == "validation":
                return None
            return So2SatMSI(self.root, name, self.so2sat_version, self.bands)
        csv = self.root / f"{split}.csv"
        if not csv.is_file():
            if split == "train":
                raise DataError(f"{csv}: train list not found (a GeoTIFF folder needs "
                                "train.csv of path,label rows)")
            return None
        classes = None if split == "train" else self.classes_of_train
        return GeoTiffFolder(csv, self.bands, multi_label=self.multi_label_csv,
                             classes=classes)

    def _load_splits(self) -> Splits:
        train = self._read("train")
        self.classes_of_train = list(train.classes)
        val, test = self._read("val"), self._read("test")
        fractions = [f for f, part in ((self.val_fraction, val), (self.test_fraction, test))
                     if part is None]
        if fractions:
            parts = carve_indices(train.targets, fractions, self.seed)
            if not parts[-1] or not all(parts[:-1]):
                raise DataError(f"{self.root}: too few samples ({len(train)}) to carve the "
                                "missing val/test splits")
            carved = [LabelledSubset(train, ix) for ix in parts[:-1]]
            train = LabelledSubset(train, parts[-1])
            if val is None:
                val = carved.pop(0)
            if test is None:
                test = carved.pop(0)
        return Splits(train, val, test, self.classes_of_train, self.dataset)

    def setup(self, stage: str | None = None) -> None:
        if self.splits is None:
            super().setup(stage)
            if self.train_subset is not None:  # a protocol's own draw of training indices
                s = self.splits
                s.train = LabelledSubset(s.train, self.train_subset(len(s.train)))
            if self.in_memory:
                s = self.splits
                s.train, s.val, s.test = InMemory(s.train), InMemory(s.val), InMemory(s.test)

    def _source(self) -> str:
        return f"{self.dataset} at {self.root}"

    def train_dataloader(self) -> DataLoader:
        return self._loader(TransformedDataset(self._loaded().train, self.train_transform),
                            self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self.eval_dataloader("val")

    def test_dataloader(self) -> DataLoader:
        return self.eval_dataloader("test")

    def eval_dataloader(self, split: str, batch_size: int | None = None) -> DataLoader:
        """Unshuffled loader of ``split`` ("train", "val" or "test") through
        ``eval_transform`` (none: the raw samples)."""
        if split not in ("train", "val", "test"):
            raise ConfigError(f"split: {split!r} (expected train, val or test)")
        return self._loader(TransformedDataset(getattr(self._loaded(), split),
                                               self.eval_transform),
                            batch_size or self.batch_size, shuffle=False)


class InMemory(Dataset):
    """Every sample of ``dataset`` decoded once, here in the main process (so loader
    workers inherit the samples instead of decoding them again), and kept; ``targets`` and
    ``classes`` as the parent's."""

    def __init__(self, dataset: Dataset) -> None:
        self.targets = list(dataset.targets)
        self.classes = list(dataset.classes)
        self._samples = [dataset[i] for i in range(len(dataset))]

    def __len__(self) -> int:
        return len(self._samples)

    def __getitem__(self, index: int):
        return self._samples[index]


class _Standardize:
    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        import torch

        self.mean = torch.tensor([float(v) for v in mean]).view(-1, 1, 1)
        self.std = torch.tensor([float(v) for v in std]).view(-1, 1, 1)

    def __call__(self, image):
        if image.shape[0] != self.mean.shape[0]:
            raise ConfigError(f"data.mean / data.std: {self.mean.shape[0]} values for "
                              f"{image.shape[0]}-band images")
        return (image - self.mean) / self.std


class MultispectralTrainTransform:
    """MAE's pretraining augmentation (``main_pretrain.py``: RandomResizedCrop(scale 0.2 - 1,
    bicubic), horizontal flip, normalize) on a band tensor: ``image`` ``(C, size, size)``,
    ``(x - mean) / std`` per band (digital-number statistics)."""

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float],
                 scale: tuple[float, float] = (0.2, 1.0)) -> None:
        from torchvision.transforms import InterpolationMode, v2

        self.crop = v2.Compose([
            v2.RandomResizedCrop(size, scale=scale, interpolation=InterpolationMode.BICUBIC,
                                 antialias=True),
            v2.RandomHorizontalFlip()])
        self.standardize = _Standardize(mean, std)

    def __call__(self, sample: dict) -> dict:
        return {**sample, "image": self.standardize(self.crop(sample["image"]))}


class MultispectralEvalTransform:
    """``image`` resized to ``size`` (bicubic, antialiased) and normalized as the train
    transform: the pretraining's validation batches."""

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        from torchvision.transforms import InterpolationMode, v2

        self.resize = v2.Resize((size, size), interpolation=InterpolationMode.BICUBIC,
                                antialias=True)
        self.standardize = _Standardize(mean, std)

    def __call__(self, sample: dict) -> dict:
        return {**sample, "image": self.standardize(self.resize(sample["image"]))}
