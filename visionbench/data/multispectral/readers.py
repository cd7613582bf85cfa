"""Readers of multispectral classification data, every sample a dict ``{"image": float32
(C, H, W) digital numbers (reflectance x 10000), "label": int64 () or multi-hot (K,)}`` with
``C = len(bands)`` in the order asked for (default the 13 ``S2_BANDS``); a band the source
lacks is zeros.

- ``EuroSATMS``: torchgeo's ``EuroSAT`` (13-band GeoTIFFs under
  ``ds/images/remote_sensing/otherDatasets/sentinel_2/tif/<Class>/``, split files
  ``eurosat-{train,val,test}.txt``), re-ordered from the files' order (B8A last) to the one
  asked for.
- ``BigEarthNetS2``: torchgeo's ``BigEarthNet`` v1 with ``bands="s2"`` (per-band GeoTIFFs of
  a patch folder, the 20 m / 60 m bands read at 120 px with rasterio's bilinear resampling,
  labels from ``<patch>_labels_metadata.json`` mapped to the 19-class nomenclature), B10
  zero-padded.
- ``So2SatMSI``: torchgeo's ``So2Sat`` (HDF5 ``sen2``, 10 bands; values are reflectance and
  are scaled here to x 10000), B01 / B09 / B10 zero-padded.
- ``GeoTiffFolder``: any GeoTIFFs with a CSV of ``path,label`` rows (paths relative to the
  CSV), bands named by the files' band descriptions or by ``file_bands``, nodata pixels set
  to ``fill``.

A missing layout, an unreadable GeoTIFF or a label outside the nomenclature is a
``DataError`` naming the file.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from visionbench.data.multispectral.bands import (
    BIGEARTHNET_BANDS,
    EUROSAT_FILE_ORDER,
    REFLECTANCE_SCALE,
    S2_BANDS,
    canonical_band,
    select_bands,
)
from visionbench.data.multispectral.geotiff import read_geotiff
from visionbench.errors import ConfigError, DataError

SO2SAT_BANDS = ("B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12")
SO2SAT_CLASSES = tuple(f"LCZ {name}" for name in (
    "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "A", "B", "C", "D", "E", "F", "G"))


def _bands(bands: Sequence[str] | None) -> tuple[str, ...]:
    names = tuple(canonical_band(b) for b in (bands or S2_BANDS))
    if len(set(names)) != len(names):
        raise ConfigError(f"bands {list(bands)}: a band is named twice")
    return names


def _not_found(what: str, root, expected: str) -> DataError:
    return DataError(f"{root}: no {what} data set there (expected {expected}; nothing is "
                     "downloaded)")


class _Wrapped(Dataset):
    """A torchgeo data set with its bands re-ordered and padded, errors as DataErrors."""

    source_bands: tuple[str, ...] = ()

    def __init__(self, dataset, bands: Sequence[str] | None) -> None:
        self.dataset = dataset
        self.bands = _bands(bands)

    def __len__(self) -> int:
        return len(self.dataset)

    def _path(self, index: int) -> str:
        return str(index)

    def __getitem__(self, index: int) -> dict:
        from rasterio.errors import RasterioError

        try:
            sample = self.dataset[index]
        except RasterioError as err:
            raise DataError(f"{self._path(index)}: not a readable GeoTIFF ({err})") from None
        except (IndexError, ValueError) as err:  # torchgeo: no label file, no band files
            raise DataError(f"{self._path(index)}: incomplete sample ({err})") from None
        if sample["image"].shape[0] != len(self.source_bands):
            raise DataError(f"{self._path(index)}: {sample['image'].shape[0]} bands, expected "
                            f"{len(self.source_bands)} ({', '.join(self.source_bands)})")
        image = select_bands(sample["image"].numpy(), self.source_bands, self.bands)
        return {"image": torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)),
                "label": sample["label"]}


class EuroSATMS(_Wrapped):
    source_bands = EUROSAT_FILE_ORDER

    def __init__(self, root: str | Path, split: str = "train",
                 bands: Sequence[str] | None = None) -> None:
        from torchgeo.datasets import DatasetNotFoundError, EuroSAT

        if split not in ("train", "val", "test"):
            raise ConfigError(f"EuroSAT split {split!r} (expected train, val or test)")
        try:
            dataset = EuroSAT(str(root), split=split, bands=EUROSAT_FILE_ORDER)
        except (DatasetNotFoundError, FileNotFoundError):
            raise _not_found("EuroSAT-MS", root, "ds/images/remote_sensing/otherDatasets/"
                             f"sentinel_2/tif/<Class>/*.tif and eurosat-{split}.txt") from None
        super().__init__(dataset, bands)
        self.classes = list(dataset.classes)
        self.targets = [t for _, t in dataset.samples]

    def _path(self, index: int) -> str:
        return self.dataset.samples[index][0]


class BigEarthNetS2(_Wrapped):
    source_bands = BIGEARTHNET_BANDS

    def __init__(self, root: str | Path, split: str = "train",
                 bands: Sequence[str] | None = None, num_classes: int = 19) -> None:
        from torchgeo.datasets import BigEarthNet, DatasetNotFoundError

        if split not in ("train", "val", "test"):
            raise ConfigError(f"BigEarthNet split {split!r} (expected train, val or test)")
        if num_classes not in (19, 43):
            raise ConfigError(f"BigEarthNet num_classes {num_classes} (expected 19 or 43)")
        try:
            dataset = BigEarthNet(str(root), split=split, bands="s2", num_classes=num_classes)
        except (DatasetNotFoundError, FileNotFoundError):
            raise _not_found("BigEarthNet-S2", root, "BigEarthNet-v1.0/<patch>/ and "
                             "bigearthnet-{train,val,test}.csv") from None
        super().__init__(dataset, bands)
        self.classes = list(dataset.class_sets[num_classes])
        # multi-hot targets: one stratum, so a label fraction is a seeded random subset (as
        # SSL4EO-S12's linear_BE_moco.py draws BigEarthNet-10 %)
        self.targets = [0] * len(dataset)

    def _path(self, index: int) -> str:
        return self.dataset.folders[index]["s2"]

    def __getitem__(self, index: int) -> dict:
        try:
            return super().__getitem__(index)
        except KeyError as err:
            raise DataError(f"{self._path(index)}: label {err} is not in BigEarthNet's "
                            "43-class CORINE nomenclature") from None


class So2SatMSI(_Wrapped):
    source_bands = SO2SAT_BANDS

    def __init__(self, root: str | Path, split: str = "train", version: str = "3_random",
                 bands: Sequence[str] | None = None) -> None:
        from torchgeo.datasets import DatasetNotFoundError, So2Sat

        splits = ("train", "validation", "test") if version == "2" else ("train", "test")
        if version not in So2Sat.filenames_by_version:
            raise ConfigError(f"So2Sat version {version!r} (expected one of "
                              f"{', '.join(So2Sat.filenames_by_version)})")
        if split not in splits:
            raise ConfigError(f"So2Sat {version} split {split!r} (expected one of "
                              f"{', '.join(splits)})")
        try:
            dataset = So2Sat(str(root), version=version, split=split,
                             bands=tuple(f"S2_{b}" for b in SO2SAT_BANDS))
        except (DatasetNotFoundError, FileNotFoundError):
            name = So2Sat.filenames_by_version[version][split]
            raise _not_found("So2Sat LCZ42", root, name) from None
        super().__init__(dataset, bands)
        self.classes = list(SO2SAT_CLASSES)
        import h5py

        with h5py.File(dataset.fn, "r") as f:
            self.targets = np.asarray(f["label"]).argmax(axis=1).tolist()

    def __getitem__(self, index: int) -> dict:
        sample = super().__getitem__(index)
        return {**sample, "image": sample["image"] * REFLECTANCE_SCALE}


class GeoTiffFolder(Dataset):
    """GeoTIFFs listed in ``labels_csv`` (a header ``path,label``; ``label`` a class name, or
    several joined by ``;`` for multi-hot targets with ``multi_label=True``). Classes: the
    sorted label names. The bands of a file are its band descriptions, else ``file_bands``;
    nodata pixels are ``fill``."""

    def __init__(self, labels_csv: str | Path, bands: Sequence[str] | None = None,
                 file_bands: Sequence[str] | None = None, multi_label: bool = False,
                 fill: float = 0.0, classes: Sequence[str] | None = None) -> None:
        path = Path(labels_csv)
        if not path.is_file():
            raise DataError(f"{path}: label CSV not found")
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or not {"path", "label"} <= set(reader.fieldnames):
                raise DataError(f"{path}: expected a header with columns path,label")
            rows = [(line, row["path"], row["label"]) for line, row in
                    enumerate(reader, start=2)]
        if not rows:
            raise DataError(f"{path}: no rows")
        names = [[n.strip() for n in label.split(";")] if multi_label else [label.strip()]
                 for _, _, label in rows]
        self.classes = list(classes) if classes is not None else sorted(
            {n for row in names for n in row})
        index = {c: i for i, c in enumerate(self.classes)}
        for (line, _, label), row in zip(rows, names, strict=True):
            unknown = [n for n in row if n not in index]
            if unknown or not all(row):
                raise DataError(f"{path}:{line}: label {label!r} is not one of the classes "
                                f"({', '.join(self.classes)})")
        self.files = [path.parent / p for _, p, _ in rows]
        self.labels = [[index[n] for n in row] for row in names]
        self.targets = [row[0] for row in self.labels]
        self.bands = _bands(bands)
        self.file_bands = tuple(canonical_band(b) for b in file_bands) if file_bands else None
        self.multi_label, self.fill = multi_label, fill

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        file = self.files[index]
        if not file.is_file():
            raise DataError(f"{file}: listed in the label CSV but not found")
        raster = read_geotiff(file, fill=self.fill)
        available = self.file_bands or raster.names
        if any(name is None for name in available):
            raise DataError(f"{file}: bands without descriptions; name them with file_bands")
        if len(available) != raster.data.shape[0]:
            raise DataError(f"{file}: {raster.data.shape[0]} bands, {len(available)} band "
                            "names given")
        available = tuple(canonical_band(b) for b in available)
        image = select_bands(raster.data.astype(np.float32), available, self.bands)
        if self.multi_label:
            label = torch.zeros(len(self.classes), dtype=torch.long)
            label[self.labels[index]] = 1
        else:
            label = torch.tensor(self.labels[index][0])
        return {"image": torch.from_numpy(image), "label": label}
