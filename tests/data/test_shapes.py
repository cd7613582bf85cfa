import json
from pathlib import Path

import pytest

from visionbench.data.cache import MARKER
from visionbench.data.datamodule import load_splits
from visionbench.data.images.imagefolder import ImageFolderDataset
from visionbench.data.images.shapes import (
    SHAPES_CLASSES,
    default_cache_dir,
    generate_shapes,
    prepare_shapes,
    shapes_root,
)
from visionbench.errors import DataError

SMALL = dict(image_size=16, train_per_class=2, val_per_class=1, test_per_class=1)


def files_of(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.png"))}


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_shapes(tmp_path_factory.mktemp("shapes") / "s0", seed=0, **SMALL)


def test_layout_counts_and_marker(generated: Path) -> None:
    assert len(SHAPES_CLASSES) >= 10 and len(set(SHAPES_CLASSES)) == len(SHAPES_CLASSES)
    for split, per_class in (("train", 2), ("val", 1), ("test", 1)):
        assert sorted(p.name for p in (generated / split).iterdir()) == sorted(SHAPES_CLASSES)
        assert len(list((generated / split).rglob("*.png"))) == per_class * len(SHAPES_CLASSES)
    assert (generated / "train" / "circle" / "00001.png").is_file()
    marker = json.loads((generated / MARKER).read_text())
    assert marker["seed"] == 0 and marker["image_size"] == 16
    assert [p.name for p in generated.parent.iterdir()] == ["s0"]  # no temporary left over


def test_same_seed_is_byte_identical_and_another_seed_differs(
    generated: Path, tmp_path: Path
) -> None:
    same = generate_shapes(tmp_path / "again", seed=0, **SMALL)
    other = generate_shapes(tmp_path / "other", seed=1, **SMALL)
    assert files_of(same) == files_of(generated)
    other_files = files_of(other)
    assert other_files.keys() == files_of(generated).keys()
    assert all(other_files[k] != v for k, v in files_of(generated).items())


def test_images_do_not_depend_on_how_many_are_generated(generated: Path, tmp_path: Path) -> None:
    bigger = generate_shapes(
        tmp_path / "bigger",
        seed=0,
        image_size=16,
        train_per_class=3,
        val_per_class=1,
        test_per_class=1,
    )
    big_files = files_of(bigger)
    assert all(big_files[k] == v for k, v in files_of(generated).items())


def test_second_call_is_a_no_op_and_other_params_are_a_data_error(generated: Path) -> None:
    png = generated / "test" / "star" / "00000.png"
    before = (png.stat().st_mtime_ns, (generated / MARKER).stat().st_mtime_ns)
    assert generate_shapes(generated, seed=0, **SMALL) == generated
    assert (png.stat().st_mtime_ns, (generated / MARKER).stat().st_mtime_ns) == before
    with pytest.raises(DataError, match="delete the folder or pick another") as err:
        generate_shapes(generated, seed=5, **SMALL)
    assert str(generated) in str(err.value)


def test_foreign_folder_is_not_overwritten(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("user data")
    with pytest.raises(DataError, match="not a finished shapes data set"):
        generate_shapes(tmp_path / "mine", **SMALL)
    assert (tmp_path / "mine" / "keep.txt").read_text() == "user data"


def test_readable_by_the_imagefolder_reader(generated: Path) -> None:
    ds = ImageFolderDataset(generated / "val")
    assert ds.classes == sorted(SHAPES_CLASSES) and len(ds) == len(SHAPES_CLASSES)
    img, _ = ds[0]
    assert img.size == (16, 16) and img.mode == "RGB"
    splits = load_splits(generated)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (20, 10, 10)


def test_cache_dir_and_root_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VISIONBENCH_CACHE", str(tmp_path / "cache"))
    assert default_cache_dir() == tmp_path / "cache"
    root = shapes_root(32, 7, 200, 40, 40)
    assert root.parent == tmp_path / "cache"
    assert "32px" in root.name and "s7" in root.name and "200-40-40" in root.name
    assert shapes_root(32, 7, 200, 40, 41) != root
    prepared = prepare_shapes(
        image_size=8, seed=0, train_per_class=1, val_per_class=1, test_per_class=1
    )
    assert prepared.parent == tmp_path / "cache" and (prepared / MARKER).is_file()
    monkeypatch.delenv("VISIONBENCH_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "visionbench"
