import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from visionbench.data.cache import MARKER
from visionbench.data.images.imagefolder import ImageFolderDataset
from visionbench.data.images.shapes import default_cache_dir
from visionbench.data.infrared.readers import (
    SODA_CLASSES,
    InfMixDataset,
    SODADataset,
    detect_segmentation_format,
)
from visionbench.data.infrared.synthetic import (
    GENERATOR_VERSION,
    MAX_COUNTS,
    THERMAL_CLASSES,
    automatic_gain_control,
    generate_thermal,
    pink_noise,
    prepare_thermal,
    render_counts,
    render_thermal,
    thermal_root,
)
from visionbench.errors import DataError

SMALL = dict(image_size=32, n_train=5, n_test=3, n_pretrain=4)


def files_of(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MARKER
    }


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_thermal(tmp_path_factory.mktemp("thermal") / "t0", seed=0, **SMALL)


def test_writes_soda_layout_with_marker(generated: Path) -> None:
    assert detect_segmentation_format(generated) == "soda"
    images = sorted(p.name for p in (generated / "JPEGImages").iterdir())
    masks = sorted(p.name for p in (generated / "SegmentationClassPNG").iterdir())
    assert images == masks == [f"{i:05d}.png" for i in range(8)]
    assert (generated / "train_infrared.txt").read_text().split() == [f"{i:05d}" for i in range(5)]
    assert (generated / "test_infrared.txt").read_text().split() == ["00005", "00006", "00007"]
    assert len(list((generated / "pretrain" / "thermal").glob("*.png"))) == 4
    marker = json.loads((generated / MARKER).read_text())
    assert marker["seed"] == 0 and marker["version"] == GENERATOR_VERSION
    assert [p.name for p in generated.parent.iterdir()] == ["t0"]  # no temporary left over


def test_soda_reader_reads_it_back(generated: Path) -> None:
    train, test = SODADataset(generated, "train"), SODADataset(generated, "test")
    assert len(train) == 5 and len(test) == 3 and train.num_classes == len(SODA_CLASSES)
    img, mask = test[0]
    arr = np.asarray(img)
    assert img.size == (32, 32) and (arr[..., 0] == arr[..., 2]).all()
    assert mask.dtype == torch.long and mask.shape == (32, 32)
    assert set(mask.unique().tolist()) <= set(THERMAL_CLASSES)
    with Image.open(generated / "JPEGImages" / "00000.png") as stored:
        assert stored.mode == "L"  # 8-bit grey
    with Image.open(generated / "SegmentationClassPNG" / "00000.png") as stored:
        assert stored.mode == "P"  # palette indices, as labelme2voc writes


def test_same_seed_same_bytes_other_seed_differs(generated: Path, tmp_path: Path) -> None:
    same = generate_thermal(tmp_path / "again", seed=0, **SMALL)
    other = generate_thermal(tmp_path / "other", seed=1, **SMALL)
    assert files_of(same) == files_of(generated)
    ours, theirs = files_of(generated), files_of(other)
    assert ours.keys() == theirs.keys()
    assert all(theirs[k] != v for k, v in ours.items() if k.endswith(".png"))


def test_pretrain_split_feeds_imagefolder_and_infmix(generated: Path) -> None:
    folder = ImageFolderDataset(generated / "pretrain")
    assert folder.classes == ["thermal"] and len(folder) == 4
    mix = InfMixDataset([SODADataset(generated, "train"), generated / "pretrain" / "thermal"])
    assert len(mix) == 9 and mix[8].mode == "RGB"


def test_counts_are_14_bit_and_images_8_bit() -> None:
    counts, label = render_counts(np.random.default_rng(3), 48)
    assert counts.dtype == np.uint16 and counts.shape == label.shape == (48, 48)
    assert 0 <= counts.min() and counts.max() <= MAX_COUNTS == 16383
    assert counts.max() - counts.min() > 255  # a real 14-bit range, not 8-bit values
    image = automatic_gain_control(counts, np.random.default_rng(0))
    assert image.dtype == np.uint8 and image.min() < 40 and image.max() > 215


def best_threshold_iou(image: np.ndarray, target: np.ndarray) -> float:
    """The best IoU with ``target`` of ``image >= t`` or ``image <= t`` over all t."""
    pos = np.bincount(image[target], minlength=256)
    neg = np.bincount(image[~target], minlength=256)
    above = np.cumsum(pos[::-1])[::-1] / (pos.sum() + np.cumsum(neg[::-1])[::-1])
    below = np.cumsum(pos) / (pos.sum() + np.cumsum(neg))
    return float(max(above.max(), below.max()))


def test_classes_over_the_set_and_objects_not_a_threshold() -> None:
    scenes = [render_thermal(np.random.default_rng([7, i]), 48) for i in range(30)]
    image = np.stack([im for im, _ in scenes]).ravel()
    label = np.stack([lab for _, lab in scenes]).ravel()
    seen = set(np.unique(label).tolist())
    assert seen <= set(THERMAL_CLASSES) and len(seen) >= 6
    for name in ("person", "car", "animal", "pole"):
        target = label == SODA_CLASSES.index(name)
        assert target.any() and best_threshold_iou(image, target) < 0.25, name


def test_pink_noise_is_normalized_and_has_low_frequency_power() -> None:
    field = pink_noise(np.random.default_rng(0), (64, 64), beta=1.0)
    assert abs(field.mean()) < 1e-4 and abs(field.std() - 1) < 1e-3
    power = np.abs(np.fft.fft2(field)) ** 2
    assert power[1:3, 1:3].mean() > 20 * power[28:36, 28:36].mean()


def test_prepare_uses_the_cache_once_and_refuses_other_parameters(tmp_path: Path) -> None:
    root = prepare_thermal(seed=2, n_train=2, n_test=1, n_pretrain=1, size=24)
    assert root == thermal_root(24, 2, 2, 1, 1) and root.parent == default_cache_dir()
    assert root.name == f"thermal-v{GENERATOR_VERSION}-24px-s2-n2-1-1"
    stamp = (root / MARKER).stat().st_mtime_ns
    assert prepare_thermal(seed=2, n_train=2, n_test=1, n_pretrain=1, size=24) == root
    assert (root / MARKER).stat().st_mtime_ns == stamp
    with pytest.raises(DataError, match="other parameters"):
        generate_thermal(root, image_size=24, n_train=3, n_test=1, n_pretrain=1, seed=2)
    half = tmp_path / "half"
    (half / "JPEGImages").mkdir(parents=True)
    with pytest.raises(DataError, match="not a finished thermal data set"):
        prepare_thermal(half, size=24, n_train=1, n_test=1, n_pretrain=0)
