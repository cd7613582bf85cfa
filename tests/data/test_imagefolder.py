from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from visionbench.data.images.imagefolder import ImageFolderDataset
from visionbench.errors import DataError


def write_image(path: Path, size=(8, 6), seed=0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    write_image(root / "cat" / "b.png")
    write_image(root / "cat" / "A.PNG")
    write_image(root / "cat" / "c.jpg")
    write_image(root / "dog" / "x.bmp")
    (root / "dog" / "notes.txt").write_text("not an image")
    (root / "README.md").write_text("a file at the root is not a class")
    return root


def test_classes_and_labels_come_from_folders(folder: Path) -> None:
    ds = ImageFolderDataset(folder)
    assert ds.classes == ["cat", "dog"]
    names = [Path(p).relative_to(folder).as_posix() for p, _ in ds.samples]
    assert names == ["cat/A.PNG", "cat/b.png", "cat/c.jpg", "dog/x.bmp"]
    assert ds.targets == [0, 0, 0, 1]
    img, label = ds[3]
    assert isinstance(img, Image.Image) and img.mode == "RGB" and img.size == (8, 6)
    assert label == 1
    assert len(ds) == 4


def test_given_class_list_sets_the_labels_and_mode_and_transform(folder: Path) -> None:
    ds = ImageFolderDataset(
        folder, classes=["dog", "cat", "bird"], mode="L", transform=lambda im: im.size
    )
    assert ds.targets == [1, 1, 1, 0]
    assert ds[0] == ((8, 6), 1)
    assert ImageFolderDataset(folder, mode="L")[0][0].mode == "L"


def test_folder_outside_the_class_list_is_a_data_error(folder: Path) -> None:
    with pytest.raises(DataError, match="label outside the class list") as err:
        ImageFolderDataset(folder, classes=["cat"])
    assert str(folder / "dog") in str(err.value)


def test_corrupt_png_is_a_data_error_naming_the_file(folder: Path) -> None:
    bad = folder / "dog" / "y.png"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8).tobytes())
    ds = ImageFolderDataset(folder)
    index = [p for p, _ in ds.samples].index(str(bad))
    with pytest.raises(DataError, match="cannot read image") as err:
        ds[index]
    assert str(bad) in str(err.value)
    assert "\n" not in str(err.value)


def test_truncated_png_is_a_data_error_even_if_truncated_loading_was_on(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    good = write_image(folder / "dog" / "z.png", size=(64, 64), seed=1)
    data = good.read_bytes()
    good.write_bytes(data[: len(data) // 2])
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    ds = ImageFolderDataset(folder)
    index = [p for p, _ in ds.samples].index(str(good))
    with pytest.raises(DataError, match="cannot read image") as err:
        ds[index]
    assert str(good) in str(err.value)


def test_empty_root_missing_root_and_empty_class_are_data_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=str(empty)):
        ImageFolderDataset(empty)
    with pytest.raises(DataError, match="not found"):
        ImageFolderDataset(tmp_path / "missing")
    write_image(tmp_path / "root" / "a" / "1.png")
    (tmp_path / "root" / "b").mkdir()
    (tmp_path / "root" / "b" / "1.txt").write_text("x")
    with pytest.raises(DataError, match="holds no images") as err:
        ImageFolderDataset(tmp_path / "root")
    assert str(tmp_path / "root" / "b") in str(err.value)
