from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from visionbench.data.images.imagefolder import ImageFolderDataset
from visionbench.data.infrared.readers import (
    IGNORE_INDEX,
    INFRARED_MEAN,
    INFRARED_STD,
    MFNET_CLASSES,
    SCUT_SEG_CLASSES,
    SEGMENTATION_CLASSES,
    SODA_CLASSES,
    InfMixDataset,
    MFNetDataset,
    SCUTSegDataset,
    SegmentationTransform,
    SODADataset,
    detect_segmentation_format,
    photometric_distortion,
    read_segmentation_dataset,
)
from visionbench.errors import DataError

W, H = 10, 8


def grey(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (H, W), dtype=np.uint8)


def label_map(seed: int, num_classes: int) -> np.ndarray:
    mask = np.random.default_rng(100 + seed).integers(0, num_classes, (H, W), dtype=np.uint8)
    mask[0, 0] = IGNORE_INDEX
    return mask


def save_mask(path: Path, mask: np.ndarray, palette: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(mask, mode="P" if palette else "L")
    if palette:
        img.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
    img.save(path)


def write_list(path: Path, stems: list[str]) -> None:
    path.write_text("".join(f"{s}\n" for s in stems))


def make_soda(root: Path) -> Path:
    """InfraredSemanticLabel/: JPEGImages/*.jpg, SegmentationClassPNG/*.png (palette)."""
    (root / "JPEGImages").mkdir(parents=True)
    for i in range(3):
        Image.fromarray(grey(i)).convert("RGB").save(root / "JPEGImages" / f"{i:05d}.jpg")
        save_mask(root / "SegmentationClassPNG" / f"{i:05d}.png", label_map(i, 21), True)
    write_list(root / "train_infrared.txt", ["00000", "00001"])
    write_list(root / "test_infrared.txt", ["00002"])
    return root


def make_mfnet(root: Path, unip: bool = False) -> Path:
    """Original release: images/*.png 4-channel RGB-T; UNIP's: thermal_imgs/*.png."""
    for i in range(3):
        if unip:
            (root / "thermal_imgs").mkdir(parents=True, exist_ok=True)
            Image.fromarray(grey(i)).save(root / "thermal_imgs" / f"{i:05d}D.png")
        else:
            (root / "images").mkdir(parents=True, exist_ok=True)
            rgbt = np.stack([grey(10 + i), grey(20 + i), grey(30 + i), grey(i)], axis=-1)
            Image.fromarray(rgbt, mode="RGBA").save(root / "images" / f"{i:05d}D.png")
        save_mask(root / "labels" / f"{i:05d}D.png", label_map(i, 9))
    write_list(root / "train.txt", ["00000D"])
    write_list(root / ("val_test.txt" if unip else "val.txt"), ["00001D"])
    write_list(root / "test.txt", ["00002D"])
    return root


def make_scut(root: Path) -> Path:
    (root / "images").mkdir(parents=True)
    for i in range(2):
        Image.fromarray(grey(i)).save(root / "images" / f"img_{i}.jpg")
        save_mask(root / "labels" / f"img_{i}.png", label_map(i, 10))
    write_list(root / "train.txt", ["img_0"])
    write_list(root / "val.txt", ["img_1"])
    return root


def assert_grey3(img: Image.Image) -> np.ndarray:
    arr = np.asarray(img)
    assert img.mode == "RGB" and arr.shape == (H, W, 3)
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()
    return arr[..., 0]


def assert_one_line_error(err: pytest.ExceptionInfo, path: Path) -> None:
    message = str(err.value)
    assert "\n" not in message and str(path) in message


# ----------------------------------------------------------------------------- readers


def test_soda_reads_images_as_grey3_and_masks_as_long(tmp_path: Path) -> None:
    root = make_soda(tmp_path / "InfraredSemanticLabel")
    ds = SODADataset(root, "train")
    assert len(ds) == 2 and ds.num_classes == 21 == len(SODA_CLASSES)
    assert SODA_CLASSES[0] == "_background_" and SODA_CLASSES[18] == "sky"
    img, mask = ds[1]
    grey_level = assert_grey3(img)
    assert np.abs(grey_level.astype(int) - grey(1)).mean() < 12  # JPEG, lossy
    assert mask.dtype == torch.long and mask.shape == (H, W)
    assert torch.equal(mask, torch.from_numpy(label_map(1, 21)).long())
    assert int(mask[0, 0]) == IGNORE_INDEX
    assert len(SODADataset(root, "test")) == 1 and len(SODADataset(root, "val")) == 1


def test_soda_accepts_png_images(tmp_path: Path) -> None:
    root = make_soda(tmp_path / "soda")
    Image.fromarray(grey(0)).save(root / "JPEGImages" / "00000.png")
    (root / "JPEGImages" / "00000.jpg").unlink()
    img, _ = SODADataset(root, "train")[0]
    assert (assert_grey3(img) == grey(0)).all()


def test_mfnet_takes_the_thermal_channel_of_rgbt_images(tmp_path: Path) -> None:
    root = make_mfnet(tmp_path / "ir_seg_dataset")
    ds = MFNetDataset(root, "train")
    assert ds.num_classes == 9 == len(MFNET_CLASSES) and MFNET_CLASSES[1] == "car"
    img, mask = ds[0]
    assert (assert_grey3(img) == grey(0)).all()  # channel 4, not the RGB ones
    assert torch.equal(mask, torch.from_numpy(label_map(0, 9)).long())
    assert MFNetDataset(root, "val").split_file.name == "val.txt"
    assert MFNetDataset(root, "test").names == ["00002D"]


def test_mfnet_unip_layout_thermal_imgs_and_val_test(tmp_path: Path) -> None:
    root = make_mfnet(tmp_path / "MFNet_thermal", unip=True)
    ds = MFNetDataset(root, "val")
    assert ds.split_file.name == "val_test.txt" and ds.image_dir.name == "thermal_imgs"
    img, _ = ds[0]
    assert (assert_grey3(img) == grey(1)).all()


def test_mfnet_rejects_a_three_channel_image_in_images(tmp_path: Path) -> None:
    root = make_mfnet(tmp_path / "mf")
    bad = root / "images" / "00000D.png"
    Image.fromarray(grey(0)).convert("RGB").save(bad)
    with pytest.raises(DataError, match="4-channel") as err:
        MFNetDataset(root, "train")[0]
    assert_one_line_error(err, bad)


def test_scut_seg_tests_on_val(tmp_path: Path) -> None:
    root = make_scut(tmp_path / "SCUT_seg")
    ds = SCUTSegDataset(root, "test")
    assert ds.split_file.name == "val.txt" and ds.num_classes == 10 == len(SCUT_SEG_CLASSES)
    img, mask = ds[0]
    assert_grey3(img)
    assert torch.equal(mask, torch.from_numpy(label_map(1, 10)).long())


def test_detect_and_read_each_layout(tmp_path: Path) -> None:
    roots = {
        "soda": make_soda(tmp_path / "a"),
        "mfnet": make_mfnet(tmp_path / "b"),
        "scut-seg": make_scut(tmp_path / "c"),
    }
    roots["mfnet-unip"] = make_mfnet(tmp_path / "d", unip=True)
    expected = {"soda": SODADataset, "mfnet": MFNetDataset, "scut-seg": SCUTSegDataset}
    for name, root in roots.items():
        fmt = name.split("-unip")[0]
        assert detect_segmentation_format(root) == fmt
        ds = read_segmentation_dataset(root, "train")
        assert type(ds) is expected[fmt] and ds.classes == SEGMENTATION_CLASSES[fmt]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="unknown infrared segmentation layout"):
        detect_segmentation_format(tmp_path / "empty")


# ----------------------------------------------------------------------------- errors


def test_missing_mask_is_one_line_naming_it(tmp_path: Path) -> None:
    root = make_soda(tmp_path / "soda")
    missing = root / "SegmentationClassPNG" / "00001.png"
    missing.unlink()
    with pytest.raises(DataError, match="mask not found") as err:
        SODADataset(root, "train")
    assert_one_line_error(err, missing)


def test_mask_value_out_of_range_is_one_line_naming_it(tmp_path: Path) -> None:
    root = make_mfnet(tmp_path / "mf")
    bad = root / "labels" / "00000D.png"
    mask = label_map(0, 9)
    mask[2, 3] = 9  # MFNet has classes 0-8; 255 alone is ignored
    save_mask(bad, mask)
    ds = MFNetDataset(root, "train")
    with pytest.raises(DataError, match=r"mask values \[9\]") as err:
        ds[0]
    assert_one_line_error(err, bad)


def test_missing_root_split_file_image_and_unreadable_image(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="folder not found"):
        SODADataset(tmp_path / "nowhere", "train")
    root = make_scut(tmp_path / "scut")
    (root / "val.txt").unlink()
    with pytest.raises(DataError, match="split file not found") as err:
        SCUTSegDataset(root, "val")
    assert_one_line_error(err, root / "val.txt")
    write_list(root / "val.txt", ["img_7"])
    with pytest.raises(DataError, match="image listed in val.txt not found"):
        SCUTSegDataset(root, "val")
    corrupt = root / "images" / "img_0.jpg"
    corrupt.write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match="cannot read image") as err:
        SCUTSegDataset(root, "train")[0]
    assert_one_line_error(err, corrupt)
    with pytest.raises(DataError, match="unknown split"):
        SCUTSegDataset(root, "holdout")


def test_rgb_mask_is_rejected(tmp_path: Path) -> None:
    root = make_soda(tmp_path / "soda")
    bad = root / "SegmentationClassPNG" / "00000.png"
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(bad)
    with pytest.raises(DataError, match="single-channel") as err:
        SODADataset(root, "train")[0]
    assert_one_line_error(err, bad)


# ----------------------------------------------------------------------------- transforms


def test_joint_transform_hook_sees_image_and_mask(tmp_path: Path) -> None:
    root = make_soda(tmp_path / "soda")

    def flip_both(img: Image.Image, mask: Image.Image):
        return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT), np.fliplr(np.asarray(mask))

    img, mask = SODADataset(root, "train", joint_transform=flip_both)[0]
    assert torch.equal(mask, torch.from_numpy(label_map(0, 21)[:, ::-1].copy()).long())


def test_segmentation_transform_eval_and_train(tmp_path: Path) -> None:
    root = make_soda(tmp_path / "soda")
    x, y = SODADataset(root, "train", SegmentationTransform(size=16))[0]
    assert x.shape == (3, 16, 20) and y.shape == (16, 20) and y.dtype == torch.long
    plain = SODADataset(root, "train", SegmentationTransform())[0][0]
    expected = np.asarray(SODADataset(root, "train")[0][0], np.float32) / 255 - INFRARED_MEAN
    assert torch.allclose(plain, torch.from_numpy(expected / INFRARED_STD).permute(2, 0, 1))
    torch.manual_seed(0)
    train = SegmentationTransform(size=12, train=True, ratio_range=(0.5, 0.5))
    x, y = SODADataset(root, "train", train)[0]
    assert x.shape == (3, 12, 12) and y.shape == (12, 12)
    assert (y[6:, :] == IGNORE_INDEX).all()  # short side 6 < 12: padded with ignore
    assert (x[:, 6:, :] == 0).all()


# ----------------------------------------------------------------------------- InfMix


def test_infmix_mixes_infrared_and_greyed_rgb(tmp_path: Path) -> None:
    soda = SODADataset(make_soda(tmp_path / "soda"), "train")
    rgb_root = tmp_path / "rgb"
    colours = np.random.default_rng(5).integers(0, 256, (3, H, W, 3), dtype=np.uint8)
    for i, arr in enumerate(colours):
        (rgb_root / "cls").mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(rgb_root / "cls" / f"{i}.png")
    thermal = tmp_path / "infpre" / "ds1" / "thermal"
    thermal.mkdir(parents=True)
    Image.fromarray(grey(9)).save(thermal / "1.png")
    mix = InfMixDataset([soda, ImageFolderDataset(rgb_root), thermal])
    assert len(mix) == 2 + 3 + 1 and mix.lengths == [2, 3, 1]
    items = [mix[i] for i in range(len(mix))]
    for img in items:
        assert_grey3(img)
    greyed = np.asarray(Image.fromarray(colours[0]).convert("L"))
    assert (np.asarray(items[2])[..., 0] == greyed).all()
    assert (np.asarray(items[5])[..., 0] == grey(9)).all()
    assert mix.locate(3) == (1, 1)
    tensors = InfMixDataset([thermal], transform=lambda im: torch.tensor(np.asarray(im)))
    assert tensors[0].shape == (H, W, 3)
    with pytest.raises(DataError, match="not found"):
        InfMixDataset([tmp_path / "nope"])


def test_photometric_distortion_is_seeded_and_keeps_grey_images_grey() -> None:
    img = np.stack([grey(1)] * 3, axis=-1)
    torch.manual_seed(3)
    a = photometric_distortion(img)
    torch.manual_seed(3)
    b = photometric_distortion(img)
    assert np.array_equal(a, b) and a.dtype == np.uint8 and a.shape == img.shape
    assert np.array_equal(a[..., 0], a[..., 1]) and np.array_equal(a[..., 1], a[..., 2])
    changed = 0
    for seed in range(20):
        torch.manual_seed(seed)
        changed += not np.array_equal(photometric_distortion(img), img)
    assert changed > 10  # each step fires with probability 1/2
    flat = np.full((8, 8, 3), 100, np.uint8)
    torch.manual_seed(0)
    out = photometric_distortion(flat)
    assert out.min() >= 0 and out.max() <= 255


def test_random_crop_avoids_one_class_crops_as_cat_max_ratio_asks() -> None:
    labels = np.zeros((64, 64), np.int64)
    labels[:, 56:] = 1  # class 1 only in an 8-column strip at the right
    pixels = np.zeros((64, 64, 3), np.uint8)
    plain = SegmentationTransform(size=16, train=True, cat_max_ratio=1.0)
    strict = SegmentationTransform(size=16, train=True, cat_max_ratio=0.75)
    mixed_plain = mixed_strict = 0
    for seed in range(40):
        torch.manual_seed(seed)
        mixed_plain += len(np.unique(plain._crop(pixels, labels)[1])) > 1
        torch.manual_seed(seed)
        window = strict._crop(pixels, labels)[1]
        mixed_strict += len(np.unique(window)) > 1 and (window == 0).mean() < 0.75
    assert mixed_strict > mixed_plain  # up to 10 draws for a crop no class dominates


def test_eval_keeps_the_mask_at_the_label_resolution(tmp_path: Path) -> None:
    root = make_soda(tmp_path / "soda")
    x, y = SODADataset(root, "test", SegmentationTransform(size=16, original_mask=True))[0]
    assert x.shape == (3, 16, 20) and y.shape == (H, W)
    assert torch.equal(y, torch.from_numpy(label_map(2, 21).astype(np.int64)))
