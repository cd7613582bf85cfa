"""Multispectral data: GeoTIFF I/O, band selection and padding, the embedded Sentinel-2
layouts read back by the readers (torchgeo's EuroSAT / BigEarthNet / So2Sat underneath),
bad files as one-line DataErrors."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from affine import Affine

from visionbench.data.multispectral.bands import (
    BIGEARTHNET_BANDS,
    EUROSAT_FILE_ORDER,
    S2_BANDS,
    canonical_band,
    select_bands,
)
from visionbench.data.multispectral.geotiff import read_geotiff, write_geotiff
from visionbench.data.multispectral.readers import (
    SO2SAT_BANDS,
    BigEarthNetS2,
    EuroSATMS,
    GeoTiffFolder,
    So2SatMSI,
)
from visionbench.data.multispectral.synthetic import (
    BIGEARTHNET_DIR,
    EUROSAT_CLASSES,
    EUROSAT_DIR,
    prepare_bigearthnet,
    prepare_eurosat_ms,
)
from visionbench.errors import ConfigError, DataError

UTM = "EPSG:32632"


@pytest.fixture(scope="module")
def eurosat(tmp_path_factory) -> Path:
    return prepare_eurosat_ms(1, 1, 1, cache_dir=tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def bigearthnet(tmp_path_factory) -> Path:
    return prepare_bigearthnet(3, 1, 2, cache_dir=tmp_path_factory.mktemp("cache"))


def test_geotiff_round_trip_keeps_bands_dtype_crs_transform_and_nodata(tmp_path):
    data = np.arange(3 * 4 * 5, dtype=np.uint16).reshape(3, 4, 5) + 1
    data[:, 0, 0] = 0  # nodata in every band
    transform = Affine(10.0, 0.0, 300000.0, 0.0, -10.0, 5600000.0)
    path = tmp_path / "tile.tif"
    write_geotiff(path, data, transform=transform, crs=UTM, nodata=0, names=("B04", "B03", "B02"))
    raster = read_geotiff(path, fill=7)
    assert raster.data.dtype == np.uint16 and raster.data.shape == (3, 4, 5)
    assert raster.crs.to_epsg() == 32632 and raster.transform == transform
    assert raster.nodata == 0 and raster.names == ("B04", "B03", "B02")
    assert not raster.valid[0, 0] and raster.valid.sum() == 19
    assert (raster.data[:, 0, 0] == 7).all()  # nodata filled
    assert np.array_equal(raster.data[:, 1:], data[:, 1:])
    assert np.array_equal(read_geotiff(path, bands=[2]).data[0, 1:], data[1, 1:])
    with pytest.raises(DataError, match="band 4 of a 3-band"):
        read_geotiff(path, bands=[4])


def test_a_60m_band_resampled_to_10m_and_its_transform(tmp_path):
    coarse = np.arange(400, dtype=np.uint16).reshape(20, 20)
    transform = Affine(60.0, 0.0, 300000.0, 0.0, -60.0, 5600000.0)
    write_geotiff(tmp_path / "b01.tif", coarse, transform=transform, crs=UTM)
    near = read_geotiff(tmp_path / "b01.tif", out_shape=(120, 120), resampling="nearest")
    assert np.array_equal(near.data[0], np.kron(coarse, np.ones((6, 6), dtype=np.uint16)))
    assert near.transform == Affine(10.0, 0.0, 300000.0, 0.0, -10.0, 5600000.0)
    flat = np.full((20, 20), 1234, dtype=np.uint16)
    write_geotiff(tmp_path / "flat.tif", flat, transform=transform, crs=UTM)
    assert (read_geotiff(tmp_path / "flat.tif", out_shape=(120, 120)).data == 1234).all()


def test_band_names_and_missing_bands_zero_padded_in_order():
    assert [canonical_band(b) for b in ("B8", "b8a", "S2_B04", "B08A", "B1")] == [
        "B08", "B8A", "B04", "B8A", "B01"]
    with pytest.raises(ConfigError, match="not a Sentinel-2 band"):
        canonical_band("B13")
    ben = np.stack([np.full((2, 2), i + 1.0) for i in range(12)])  # BigEarthNet: no B10
    padded = select_bands(ben, BIGEARTHNET_BANDS)
    assert padded.shape == (13, 2, 2)
    assert [padded[i, 0, 0] for i in range(13)] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 0, 11, 12]
    so2sat = select_bands(np.ones((10, 2, 2)), SO2SAT_BANDS)
    assert [S2_BANDS[i] for i in range(13) if so2sat[i].max() == 0] == ["B01", "B09", "B10"]
    eurosat = select_bands(np.arange(13.0)[:, None, None], EUROSAT_FILE_ORDER)
    assert eurosat[S2_BANDS.index("B8A"), 0, 0] == 12  # the files' last band
    rgb = select_bands(np.arange(13.0)[:, None, None], S2_BANDS, ("B04", "B03", "B02"))
    assert rgb[:, 0, 0].tolist() == [3, 2, 1]


def test_eurosat_ms_layout_reads_back_in_band_order(eurosat):
    files = sorted((eurosat / EUROSAT_DIR).rglob("*.tif"))
    assert len(files) == 3 * len(EUROSAT_CLASSES)
    assert (eurosat / "eurosat-test.txt").read_text().count(".jpg\n") == len(EUROSAT_CLASSES)
    raw = read_geotiff(files[0])
    assert raw.data.dtype == np.uint16 and raw.data.shape == (13, 64, 64)
    assert raw.names == EUROSAT_FILE_ORDER and raw.crs.to_epsg() == 32632
    assert raw.transform.a == 10.0
    train = EuroSATMS(eurosat, "train")
    assert len(train) == len(EUROSAT_CLASSES) and train.classes == list(EUROSAT_CLASSES)
    sample = train[0]
    assert sample["image"].shape == (13, 64, 64) and sample["image"].dtype == torch.float32
    first = read_geotiff(train._path(0)).data.astype(np.float32)
    assert torch.equal(sample["image"][S2_BANDS.index("B8A")], torch.from_numpy(first[12]))
    assert torch.equal(sample["image"][S2_BANDS.index("B01")], torch.from_numpy(first[0]))
    assert [int(train[i]["label"]) for i in range(len(train))] == list(range(10))
    rgb = EuroSATMS(eurosat, "test", bands=["B04", "B03", "B02"])[0]["image"]
    assert rgb.shape == (3, 64, 64)
    # water is dark in the NIR, vegetation bright past the red edge
    sea = EuroSATMS(eurosat, "val")[EUROSAT_CLASSES.index("SeaLake")]["image"]
    forest = EuroSATMS(eurosat, "val")[EUROSAT_CLASSES.index("Forest")]["image"]
    nir, red = S2_BANDS.index("B08"), S2_BANDS.index("B04")
    assert sea[nir].mean() < sea[red].mean() * 2 and forest[nir].mean() > 3 * forest[red].mean()


def test_bigearthnet_layout_per_band_resolutions_labels_and_padding(bigearthnet):
    patch = sorted((bigearthnet / BIGEARTHNET_DIR).iterdir())[0]
    sizes = {p.stem.rsplit("_", 1)[1]: read_geotiff(p).data.shape[1:]
             for p in patch.glob("*.tif")}
    assert sorted(sizes) == sorted(BIGEARTHNET_BANDS)
    assert sizes["B02"] == (120, 120) and sizes["B05"] == (60, 60) and sizes["B01"] == (20, 20)
    meta = json.loads(next(patch.glob("*_labels_metadata.json")).read_text())
    assert meta["labels"]
    train = BigEarthNetS2(bigearthnet, "train")
    assert len(train) == 3 and len(train.classes) == 19
    first = Path(train._path(0))
    for band in ("B01", "B05", "B08", "B8A", "B09", "B12"):  # each band in its place
        file = next(first.glob(f"*_{band}.tif"))
        expected = read_geotiff(file, out_shape=(120, 120), resampling="bilinear").data[0]
        assert torch.allclose(train[0]["image"][S2_BANDS.index(band)],
                              torch.from_numpy(expected.astype(np.float32))), band
    for i in range(len(train)):
        sample = train[i]
        assert sample["image"].shape == (13, 120, 120)
        assert sample["image"][S2_BANDS.index("B10")].abs().max() == 0
        assert sample["label"].shape == (19,) and sample["label"].sum() >= 1
    assert len(BigEarthNetS2(bigearthnet, "test")) == 2


def test_generation_is_deterministic(tmp_path):
    def digest(root: Path) -> str:
        h = hashlib.sha256()
        for p in sorted(root.rglob("*.tif")):
            h.update(p.read_bytes())
        return h.hexdigest()

    a = prepare_eurosat_ms(1, 1, 1, seed=3, cache_dir=tmp_path / "a")
    b = prepare_eurosat_ms(1, 1, 1, seed=3, cache_dir=tmp_path / "b")
    assert digest(a) == digest(b)
    with pytest.raises(ConfigError, match="at least 1"):
        prepare_eurosat_ms(1, 0, 1, cache_dir=tmp_path / "c")


def test_corrupt_geotiff_missing_layout_and_unknown_label_are_data_errors(tmp_path, bigearthnet):
    import shutil

    root = tmp_path / "ben"
    shutil.copytree(bigearthnet, root)
    dataset = BigEarthNetS2(root, "test")
    folder = Path(dataset._path(0))
    meta = next(folder.glob("*_labels_metadata.json"))
    meta.write_text(json.dumps({"labels": ["Lunar regolith"]}))
    with pytest.raises(DataError, match="not in BigEarthNet's 43-class"):
        dataset[0]
    band = next(Path(dataset._path(1)).glob("*_B02.tif"))
    band.write_bytes(band.read_bytes()[:200])
    with pytest.raises(DataError, match="not a readable GeoTIFF"):
        dataset[1]
    with pytest.raises(DataError, match="no BigEarthNet-S2 data set"):
        BigEarthNetS2(tmp_path / "empty", "train")
    with pytest.raises(DataError, match="no EuroSAT-MS data set"):
        EuroSATMS(tmp_path / "empty", "train")
    bad = tmp_path / "bad.tif"
    bad.write_bytes(b"II*\x00 not a tiff")
    with pytest.raises(DataError, match="bad.tif: not a readable GeoTIFF"):
        read_geotiff(bad)


def test_geotiff_folder_with_a_label_csv(tmp_path):
    transform = Affine(10.0, 0.0, 0.0, 0.0, -10.0, 0.0)
    for name, value in (("a", 100), ("b", 200)):
        data = np.full((3, 8, 8), value, dtype=np.uint16)
        data[:, 0, 0] = 65535
        write_geotiff(tmp_path / f"{name}.tif", data, transform=transform, crs=UTM,
                      nodata=65535, names=("B04", "B03", "B02"))
    (tmp_path / "labels.csv").write_text("path,label\na.tif,forest\nb.tif,water;forest\n")
    with pytest.raises(DataError, match=r"labels.csv:3: label 'water;forest'"):
        GeoTiffFolder(tmp_path / "labels.csv", classes=["forest", "water"])
    multi = GeoTiffFolder(tmp_path / "labels.csv", multi_label=True)
    assert multi.classes == ["forest", "water"] and multi[1]["label"].tolist() == [1, 1]
    sample = multi[0]
    assert sample["image"].shape == (13, 8, 8)
    assert [S2_BANDS[i] for i in range(13) if sample["image"][i].max() > 0] == [
        "B02", "B03", "B04"]
    assert sample["image"][S2_BANDS.index("B04"), 0, 0] == 0  # nodata -> fill
    assert sample["image"][S2_BANDS.index("B04"), 1, 1] == 100
    rgb = GeoTiffFolder(tmp_path / "labels.csv", bands=["B02"], multi_label=True)[1]["image"]
    assert rgb.shape == (1, 8, 8) and rgb[0, 1, 1] == 200
    (tmp_path / "bad.csv").write_text("file,class\na.tif,forest\n")
    with pytest.raises(DataError, match="path,label"):
        GeoTiffFolder(tmp_path / "bad.csv")


def test_so2sat_hdf5_bands_padded_and_scaled(tmp_path):
    import h5py

    (tmp_path / "random").mkdir()
    rng = np.random.default_rng(0)
    with h5py.File(tmp_path / "random" / "testing.h5", "w") as f:
        f["sen1"] = rng.normal(size=(3, 32, 32, 8))
        f["sen2"] = rng.uniform(0, 0.5, (3, 32, 32, 10))
        f["label"] = np.eye(17)[[4, 0, 16]]
    dataset = So2SatMSI(tmp_path, "test")
    sample = dataset[2]
    assert len(dataset) == 3 and int(sample["label"]) == 16
    assert sample["image"].shape == (13, 32, 32)
    with h5py.File(tmp_path / "random" / "testing.h5") as f:
        b04 = f["sen2"][2, :, :, 2]
    assert torch.allclose(sample["image"][S2_BANDS.index("B04")],
                          torch.from_numpy(b04 * 10000).float(), rtol=1e-5)
    for band in ("B01", "B09", "B10"):
        assert sample["image"][S2_BANDS.index(band)].abs().max() == 0
    with pytest.raises(ConfigError, match="split 'validation'"):
        So2SatMSI(tmp_path, "validation")
    with pytest.raises(DataError, match="no So2Sat LCZ42 data set"):
        So2SatMSI(tmp_path, "train")
    from visionbench.data.multispectral.datamodule import MultispectralDataModule

    with h5py.File(tmp_path / "random" / "training.h5", "w") as f:
        f["sen1"] = np.zeros((17 * 4, 32, 32, 8))
        f["sen2"] = rng.uniform(0, 0.5, (17 * 4, 32, 32, 10))
        f["label"] = np.eye(17)[np.arange(17 * 4) % 17]
    dm = MultispectralDataModule(tmp_path, "so2sat", val_fraction=0.25)
    dm.setup()  # v3 has no validation split: a quarter of train, stratified
    assert [len(dm.splits.train), len(dm.splits.val), len(dm.splits.test)] == [51, 17, 3]
    assert sorted(dm.splits.val.targets) == list(range(17))


def test_datamodule_batches_of_raw_digital_numbers(eurosat, bigearthnet, tmp_path):
    from visionbench.data.multispectral.datamodule import MultispectralDataModule

    dm = MultispectralDataModule(eurosat, "eurosat-ms", batch_size=4)
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 13, 64, 64) and batch["label"].shape == (4,)
    assert batch["image"].max() > 100  # digital numbers, not normalized
    assert dm.num_classes == 10 and not dm.multi_label
    assert len(dm.eval_dataloader("test").dataset) == 10
    ben = MultispectralDataModule(bigearthnet, "bigearthnet", batch_size=2, label_fraction=0.34,
                                  bands=["B04", "B03", "B02", "B10"])
    batch = next(iter(ben.eval_dataloader("train")))
    assert len(ben.eval_dataloader("train").dataset) == 1  # round(3 x 0.34) of 3
    assert batch["image"].shape == (1, 4, 120, 120) and batch["label"].shape == (1, 19)
    assert ben.multi_label and batch["image"][:, 3].abs().max() == 0
    with pytest.raises(ConfigError, match="expected one of eurosat-ms"):
        MultispectralDataModule(eurosat, "sentinel")


def test_datamodule_carves_the_splits_a_folder_lacks(tmp_path):
    from visionbench.data.multispectral.datamodule import MultispectralDataModule

    transform = Affine(10.0, 0.0, 0.0, 0.0, -10.0, 0.0)
    rows = ["path,label"]
    for i in range(20):
        write_geotiff(tmp_path / f"t{i}.tif", np.full((2, 4, 4), i, dtype=np.uint16),
                      transform=transform, crs=UTM, names=("B08", "B04"))
        rows.append(f"t{i}.tif,{'forest' if i % 2 else 'water'}")
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    dm = MultispectralDataModule(tmp_path, "geotiff", batch_size=4, val_fraction=0.2,
                                 test_fraction=0.2)
    dm.setup()
    sizes = [len(dm.splits.train), len(dm.splits.val), len(dm.splits.test)]
    assert sizes == [12, 4, 4] and dm.classes == ["forest", "water"]
    image = dm.splits.test[0]["image"]
    assert image.shape == (13, 4, 4)
    assert torch.equal(image[S2_BANDS.index("B08")], image[S2_BANDS.index("B04")])
    assert image.sum() == 2 * image[S2_BANDS.index("B04")].sum()  # the other bands are zeros
    with pytest.raises(DataError, match="train list not found"):
        MultispectralDataModule(tmp_path / "none", "geotiff").setup()
