import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from visionbench.data.datamodule import (
    ImageClassificationDataModule,
    TransformedDataset,
    build_transform,
    carve_indices,
    detect_format,
    load_splits,
)
from visionbench.errors import ConfigError, DataError


def write_png(path: Path, value: int = 0, size=(6, 5)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value % 256, 0, 0)).save(path)


def write_folder(root: Path, classes, per_class: int) -> Path:
    for c, name in enumerate(classes):
        for i in range(per_class):
            write_png(root / name / f"{i:03d}.png", value=10 * c + i)
    return root


def write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def write_mnist(root: Path, n_train=40, n_test=10) -> Path:
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 7, 7)))
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return root


def test_detect_format_on_both_layouts_and_an_unknown_one(tmp_path: Path) -> None:
    split_root = tmp_path / "split"
    write_folder(split_root / "train", ["a", "b"], 1)
    assert detect_format(split_root) == "imagefolder"
    assert detect_format(write_folder(tmp_path / "flat", ["a", "b"], 1)) == "imagefolder"
    assert detect_format(write_mnist(tmp_path / "mnist")) == "idx"
    assert detect_format(write_mnist(tmp_path / "mnist2" / "raw").parent) == "idx"
    unknown = tmp_path / "unknown"
    (unknown / "stuff").mkdir(parents=True)
    (unknown / "stuff" / "x.csv").write_text("1,2")
    with pytest.raises(DataError, match="unknown data set layout") as err:
        detect_format(unknown)
    assert str(unknown) in str(err.value) and "idx" in str(err.value).lower()
    with pytest.raises(DataError, match="not found"):
        detect_format(tmp_path / "missing")


def test_carving_is_stratified_disjoint_and_deterministic(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "flat", ["a", "b", "c"], 10)
    first = load_splits(root, val_fraction=0.2, test_fraction=0.1, seed=3)
    again = load_splits(root, val_fraction=0.2, test_fraction=0.1, seed=3)
    other = load_splits(root, val_fraction=0.2, test_fraction=0.1, seed=4)
    assert (len(first.train), len(first.val), len(first.test)) == (21, 6, 3)
    assert sorted(first.val.targets) == [0, 0, 1, 1, 2, 2]
    parts = [set(first.train.indices), set(first.val.indices), set(first.test.indices)]
    assert set().union(*parts) == set(range(30)) and sum(map(len, parts)) == 30
    assert first.val.indices == again.val.indices and first.test.indices == again.test.indices
    assert first.val.indices != other.val.indices
    assert first.classes == ["a", "b", "c"] and first.format == "imagefolder"
    img, label = first.val[0]
    assert isinstance(img, Image.Image) and label == first.val.targets[0]


def test_carve_indices_exact_sizes_with_uneven_classes() -> None:
    targets = [0] * 7 + [1] * 3 + [2] * 11
    val, test, train = carve_indices(targets, [0.25, 0.1], seed=0)
    assert (len(val), len(test), len(train)) == (round(21 * 0.25), round(21 * 0.1), 14)
    assert not set(val) & set(test) and not set(val) & set(train)


def test_folder_splits_are_used_and_missing_ones_carved(tmp_path: Path) -> None:
    root = tmp_path / "imagenet_style"
    write_folder(root / "train", ["a", "b"], 10)
    write_folder(root / "val", ["a", "b"], 2)
    splits = load_splits(root, val_fraction=0.1, seed=0)
    assert len(splits.test) == 4  # the val folder is the test set
    assert (len(splits.train), len(splits.val)) == (18, 2)
    write_folder(root / "test", ["a", "b"], 3)
    splits = load_splits(root)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (20, 4, 6)


def test_val_class_outside_train_classes_is_a_data_error(tmp_path: Path) -> None:
    root = tmp_path / "d"
    write_folder(root / "train", ["a", "b"], 2)
    write_folder(root / "test", ["a", "z"], 1)
    with pytest.raises(DataError, match="label outside the class list") as err:
        load_splits(root)
    assert str(root / "test" / "z") in str(err.value)


def test_idx_splits_use_t10k_as_test(tmp_path: Path) -> None:
    splits = load_splits(write_mnist(tmp_path / "mnist"), val_fraction=0.25, seed=0)
    assert splits.format == "idx" and splits.classes == [str(i) for i in range(10)]
    assert (len(splits.train), len(splits.val), len(splits.test)) == (30, 10, 10)
    assert splits.train[0][0].mode == "RGB"


def test_bad_fractions_are_config_errors(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "flat", ["a"], 3)
    with pytest.raises(ConfigError):
        load_splits(root, val_fraction=0.6, test_fraction=0.5)


@pytest.mark.parametrize("in_chans", [1, 3, 4])
@pytest.mark.parametrize("train", [True, False])
def test_build_transform_any_input_to_chans_and_size(in_chans: int, train: bool) -> None:
    transform = build_transform(16, in_chans, [0.5, 0.4, 0.3], [0.2, 0.2, 0.2], train)
    rng = np.random.default_rng(0)
    inputs = [
        Image.fromarray(rng.integers(0, 256, (23, 17, 4), dtype=np.uint8), "RGBA"),
        Image.fromarray(rng.integers(0, 256, (40, 50), dtype=np.uint8), "L"),
        Image.fromarray(rng.integers(0, 65535, (9, 12), dtype=np.uint16)),
    ]
    for img in inputs:
        out = transform(img)
        assert out.shape == (in_chans, 16, 16) and out.dtype == torch.float32
        assert torch.isfinite(out).all()


def test_build_transform_normalizes_with_averaged_mean_for_grey() -> None:
    transform = build_transform(4, 1, [0.2, 0.4, 0.6], [0.5, 0.5, 0.5], train=False)
    out = transform(Image.new("L", (4, 4), 255))
    assert torch.allclose(out, torch.full((1, 4, 4), (1.0 - 0.4) / 0.5))
    with pytest.raises(ConfigError):
        build_transform(4, 3, [0.5, 0.5], [0.5, 0.5], train=False)
    with pytest.raises(ConfigError):
        build_transform(4, 3, [0.5], [0.5], train=True, kind="nope")


def test_datamodule_loaders(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "flat", ["a", "b", "c"], 10)
    dm = ImageClassificationDataModule(
        root,
        image_size=8,
        in_chans=1,
        mean=[0.5],
        std=[0.5],
        batch_size=4,
        val_fraction=0.2,
        test_fraction=0.2,
    )
    assert dm.num_classes == 3 and dm.classes == ["a", "b", "c"]
    train = dm.train_dataloader()
    assert train.drop_last and len(train) == 18 // 4
    batch = next(iter(train))
    assert set(batch) == {"image", "label"}  # dict batches
    x, y = batch["image"], batch["label"]
    assert x.shape == (4, 1, 8, 8) and y.dtype == torch.int64
    assert len(dm.val_dataloader().dataset) == 6 and len(dm.test_dataloader().dataset) == 6
    ordered = dm.eval_dataloader("train", batch_size=100)
    labels = next(iter(ordered))["label"]
    assert labels.tolist() == dm.splits.train.targets
    assert isinstance(ordered.dataset, TransformedDataset)
    with pytest.raises(ConfigError):
        dm.eval_dataloader("holdout")


def test_finetune_transform_is_maes_and_eval_crops_at_0875():
    """util/datasets.py: timm's create_transform with RandAugment rand-m9-mstd0.5-inc1 and
    RandomErasing 0.25; eval: Resize(size / 0.875) then CenterCrop(size)."""
    from timm.data.auto_augment import RandAugment
    from timm.data.random_erasing import RandomErasing
    from torchvision import transforms as T

    from visionbench.data.datamodule import build_transform

    train = build_transform(32, 3, [0.5] * 3, [0.2] * 3, True, "finetune",
                            "rand-m9-mstd0.5-inc1", 0.25)
    steps = train.transforms
    policy = next(t for t in steps if isinstance(t, RandAugment))
    assert policy.num_layers == 2 and all(op.magnitude == 9 for op in policy.ops)
    erasing = next(t for t in steps if isinstance(t, RandomErasing))
    assert erasing.probability == 0.25 and erasing.mode == "pixel"
    assert isinstance(steps[-1], RandomErasing)  # after Normalize, as timm's
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), np.uint8))
    torch.manual_seed(0)
    assert all(train(image).shape == (3, 32, 32) for _ in range(50))
    grey = build_transform(32, 1, [0.5], [0.2], True, "finetune", "rand-m9-mstd0.5-inc1", 0.25)
    assert grey(image).shape == (1, 32, 32)
    evaluation = build_transform(224, 3, [0.5] * 3, [0.2] * 3, False)
    resize = next(t for t in evaluation.transforms if isinstance(t, T.Resize))
    assert resize.size == 256  # 224 / 0.875
    with pytest.raises(ConfigError, match="auto_augment"):
        build_transform(32, 3, [0.5] * 3, [0.2] * 3, True, "finetune", "nonsense-policy", 0.0)


def test_label_fraction_keeps_a_stratified_share_of_train_only(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "flat", ["a", "b", "c"], 20)

    def dm(fraction: float, seed: int = 0) -> ImageClassificationDataModule:
        module = ImageClassificationDataModule(root, image_size=8, in_chans=1, mean=[0.5],
                                               std=[0.5], batch_size=4, val_fraction=0.25,
                                               test_fraction=0.25, seed=seed,
                                               label_fraction=fraction)
        module.setup()
        return module

    full, fifth = dm(1.0), dm(0.2)
    assert len(full.splits.train) == 30  # 10 a class
    assert np.bincount(fifth.splits.train.targets).tolist() == [2, 2, 2]
    assert set(fifth.splits.train.indices) <= set(range(30))  # a subset of the train split
    assert len(fifth.splits.val) == len(full.splits.val) == 15
    assert fifth.splits.test.indices == full.splits.test.indices
    assert dm(0.2).splits.train.indices == fifth.splits.train.indices  # seeded
    assert dm(0.2, seed=1).splits.train.indices != dm(0.2, seed=0).splits.train.indices
    with pytest.raises(ConfigError, match="label fraction"):
        dm(0.0)
    with pytest.raises(DataError, match="keeps none of the 30"):
        dm(0.01)


def test_raw_eval_loader_is_the_normalized_one_before_normalize(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "flat", ["a", "b"], 6)
    dm = ImageClassificationDataModule(root, image_size=8, in_chans=3, mean=[0.4, 0.5, 0.6],
                                       std=[0.2, 0.25, 0.3], batch_size=4)
    raw = next(iter(dm.eval_dataloader("test", raw=True)))["image"]
    norm = next(iter(dm.eval_dataloader("test")))["image"]
    mean = torch.tensor(dm.input_spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(dm.input_spec.std).view(1, 3, 1, 1)
    assert torch.equal((raw - mean) / std, norm)
