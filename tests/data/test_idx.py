import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visionbench.data.images.idx import IDXDataset, read_idx
from visionbench.errors import DataError

TYPE_CODES = {"u1": 0x08, "i1": 0x09, "i2": 0x0B, "i4": 0x0C, "f4": 0x0D, "f8": 0x0E}


def write_idx(path: Path, array: np.ndarray, gz: bool = False) -> Path:
    """An IDX file written independently of the reader: header by struct, data big-endian."""
    code = TYPE_CODES[array.dtype.str[1:]]
    header = struct.pack(">BBBB", 0, 0, code, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(payload) if gz else payload)
    return path


def images_and_labels(n=5, h=4, w=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, h, w), dtype=np.uint8), rng.integers(0, 10, n, dtype=np.uint8)


@pytest.mark.parametrize("gz", [False, True])
def test_ubyte_images_and_labels_round_trip(tmp_path: Path, gz: bool) -> None:
    images, labels = images_and_labels()
    suffix = ".gz" if gz else ""
    ipath = write_idx(tmp_path / f"train-images-idx3-ubyte{suffix}", images, gz)
    lpath = write_idx(tmp_path / f"train-labels-idx1-ubyte{suffix}", labels, gz)
    np.testing.assert_array_equal(read_idx(ipath), images)
    np.testing.assert_array_equal(read_idx(lpath), labels)
    ds = IDXDataset(ipath, lpath)
    assert len(ds) == 5 and ds.classes == [str(i) for i in range(10)]
    assert ds.targets == labels.tolist()
    img, label = ds[2]
    assert isinstance(img, Image.Image) and img.mode == "L" and img.size == (3, 4)
    np.testing.assert_array_equal(np.asarray(img), images[2])
    assert label == labels[2]
    assert IDXDataset(ipath, lpath, mode="RGB")[0][0].mode == "RGB"


@pytest.mark.parametrize("dtype", ["i1", ">i2", ">i4", ">f4", ">f8"])
def test_other_types_round_trip(tmp_path: Path, dtype: str) -> None:
    array = (np.arange(24).reshape(2, 3, 4) - 7).astype(dtype)
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / "x.idx", array)), array)


def test_wrong_magic_is_a_data_error_naming_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "train-images-idx3-ubyte"
    bad.write_bytes(b"\x12\x34\x08\x03" + bytes(20))
    with pytest.raises(DataError, match="not an IDX file") as err:
        read_idx(bad)
    assert str(bad) in str(err.value)
    unknown_type = tmp_path / "type.idx"
    unknown_type.write_bytes(b"\x00\x00\x07\x01" + struct.pack(">I", 1) + b"\x00")
    with pytest.raises(DataError, match=str(unknown_type)):
        read_idx(unknown_type)


@pytest.mark.parametrize("gz", [False, True])
def test_truncated_file_is_a_data_error_naming_the_file(tmp_path: Path, gz: bool) -> None:
    images, _ = images_and_labels(n=10, h=8, w=8)
    path = write_idx(tmp_path / "images", images)
    data = path.read_bytes()[:-7]
    path.write_bytes(gzip.compress(data) if gz else data)
    with pytest.raises(DataError, match="truncated") as err:
        read_idx(path)
    assert str(path) in str(err.value)
    path.write_bytes(b"\x00\x00\x08\x03\x00\x00")  # header cut inside the sizes
    with pytest.raises(DataError, match=str(path)):
        read_idx(path)


def test_label_outside_num_classes_is_a_data_error(tmp_path: Path) -> None:
    images, labels = images_and_labels()
    labels[3] = 12
    ipath = write_idx(tmp_path / "images", images)
    lpath = write_idx(tmp_path / "labels", labels)
    with pytest.raises(DataError, match="label 12 at index 3") as err:
        IDXDataset(ipath, lpath)
    assert str(lpath) in str(err.value)
    assert IDXDataset(ipath, lpath, num_classes=13).targets[3] == 12


def test_mismatched_counts_and_missing_file_are_data_errors(tmp_path: Path) -> None:
    images, labels = images_and_labels()
    ipath = write_idx(tmp_path / "images", images)
    lpath = write_idx(tmp_path / "labels", labels[:4])
    with pytest.raises(DataError, match="4 labels for 5 images"):
        IDXDataset(ipath, lpath)
    with pytest.raises(DataError, match="not found"):
        read_idx(tmp_path / "missing")
