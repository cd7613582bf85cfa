"""ImageNet-C style corruptions: determinism, severity order, the official formulas, the layout."""

import numpy as np
import pytest
from PIL import Image

from visionbench.data.images.corruptions import (
    CORRUPTIONS,
    PARAMETERS,
    corrupt,
    disk,
    image_rng,
    motion_blur,
    plasma_fractal,
    scale_for,
)
from visionbench.data.images.imagenet_c import CorruptedSet, prepare_corrupted
from visionbench.errors import DataError


def scene(size: int = 32, seed: int = 0) -> np.ndarray:
    """A gradient with a few flat rectangles on it: edges and smooth parts."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    img = np.stack([xx * 255 / size, yy * 255 / size, 128 + 0 * xx], axis=-1).astype(float)
    for _ in range(3):
        y0, x0 = rng.integers(0, size - 8, 2)
        h, w = rng.integers(4, size // 2, 2)
        img[y0:y0 + h, x0:x0 + w] = rng.integers(0, 256, 3)
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_deterministic_for_a_seed_and_severity_monotone(corruption):
    images = [scene(32, seed) for seed in range(16)]
    change = []
    for severity in range(1, 6):
        outs = [corrupt(img, corruption, severity, image_rng(0, corruption, severity, i))
                for i, img in enumerate(images)]
        again = [corrupt(img, corruption, severity, image_rng(0, corruption, severity, i))
                 for i, img in enumerate(images)]
        assert all(np.array_equal(a, b) for a, b in zip(outs, again, strict=True))
        assert all(o.dtype == np.uint8 and o.shape == (32, 32, 3) for o in outs)
        # the same draws at every severity (noise, angle, fractal): only the strength moves
        fixed = [corrupt(img, corruption, severity, image_rng(0, corruption, 1, i))
                 for i, img in enumerate(images)]
        change.append(np.mean([np.abs(o.astype(float) - img).mean()
                               for o, img in zip(fixed, images, strict=True)]))
    assert change[0] > 0
    assert all(later >= earlier - 1e-9 for earlier, later in zip(change, change[1:],
                                                                  strict=False)), change
    assert change[-1] > 1.2 * change[0]


def test_other_seeds_draw_other_noise_and_the_input_is_untouched():
    img = scene()
    before = img.copy()
    a = corrupt(img, "gaussian_noise", 3, image_rng(0, "gaussian_noise", 3, 0))
    b = corrupt(img, "gaussian_noise", 3, image_rng(1, "gaussian_noise", 3, 0))
    assert not np.array_equal(a, b) and np.array_equal(img, before)


def test_parameters_follow_the_official_scripts():
    assert [scale_for(s) for s in (32, 64, 224)] == ["cifar", "tiny", "imagenet"]
    assert PARAMETERS["gaussian_noise"]["imagenet"] == [0.08, 0.12, 0.18, 0.26, 0.38]
    assert PARAMETERS["gaussian_noise"]["cifar"] == [0.04, 0.06, 0.08, 0.09, 0.10]
    assert PARAMETERS["pixelate"]["cifar"][-1] == 0.65
    assert PARAMETERS["motion_blur"]["imagenet"][0] == (10, 3)


def test_gaussian_noise_and_contrast_formulas_in_float64():
    img = scene()
    c = PARAMETERS["gaussian_noise"]["cifar"][1]
    noise = image_rng(3, "gaussian_noise", 2, 0).normal(size=img.shape, scale=c)
    expected = np.uint8(np.clip(img / 255.0 + noise, 0, 1) * 255)
    assert np.array_equal(corrupt(img, "gaussian_noise", 2, image_rng(3, "gaussian_noise", 2, 0)),
                          expected)
    c = PARAMETERS["contrast"]["cifar"][4]
    x = img / 255.0
    means = x.mean(axis=(0, 1), keepdims=True)
    expected = np.uint8(np.clip((x - means) * c + means, 0, 1) * 255)
    assert np.array_equal(corrupt(img, "contrast", 5, np.random.default_rng(0)), expected)


def test_disk_kernel_and_defocus_keep_a_flat_image_flat():
    kernel = disk(1.0, 0.2)
    assert kernel.shape == (17, 17) and kernel.sum() == pytest.approx(1.0)
    assert kernel[8, 8] == kernel.max() and np.allclose(kernel, kernel.T)
    assert disk(10, 0.5).shape == (21, 21)
    flat = np.full((32, 32, 3), 90, np.uint8)
    for severity in range(1, 6):
        out = corrupt(flat, "defocus_blur", severity, np.random.default_rng(0))
        assert np.abs(out.astype(int) - 90).max() <= 1


def test_motion_blur_is_imagemagicks_one_sided_gaussian():
    img = np.zeros((9, 15, 3), np.uint8)
    img[4, 7] = 255
    rng = np.random.default_rng(0)
    angle = np.random.default_rng(0).uniform(-45, 45)
    out = motion_blur(img, (2, 1.0), rng)
    taps = np.arange(5)
    weights = np.exp(-(taps**2) / 2.0)
    weights /= weights.sum()
    dx = np.ceil(taps * np.cos(np.radians(angle)) - 0.5).astype(int)
    dy = np.ceil(taps * np.sin(np.radians(angle)) - 0.5).astype(int)
    expected = np.zeros((9, 15))
    for k in range(5):  # the output at (y, x) reads (y + dy, x + dx): the dot spreads back
        expected[4 - dy[k], 7 - dx[k]] += 255 * weights[k]
    assert np.array_equal(out[..., 0], np.rint(expected))


def test_plasma_fractal_range_and_power_of_two():
    field = plasma_fractal(32, 2.0, np.random.default_rng(0))
    assert field.shape == (32, 32) and field.min() == 0.0 and field.max() == 1.0
    with pytest.raises(ValueError, match="power of two"):
        plasma_fractal(24, 2.0, np.random.default_rng(0))
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt(scene(), "snow", 1, np.random.default_rng(0))
    with pytest.raises(ValueError, match="severity"):
        corrupt(scene(), "fog", 6, np.random.default_rng(0))


def test_written_in_the_imagenet_c_layout_and_read_back(tmp_path):
    clean = tmp_path / "clean"
    for cls in ("a", "b"):
        (clean / cls).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(scene(32, i + (cls == "b"))).save(clean / cls / f"{i}.png")
    out = prepare_corrupted(clean, tmp_path / "c", seed=0, corruptions=("fog", "pixelate"),
                            severities=(1, 5))
    assert (out / "fog" / "5" / "b" / "00003.png").is_file()
    corrupted = CorruptedSet(out, severities=[1, 5])
    assert corrupted.corruptions == ["fog", "pixelate"] and corrupted.classes == ["a", "b"]
    data = corrupted.dataset("pixelate", 5)
    assert len(data) == 4 and data.targets == [0, 0, 1, 1]
    again = prepare_corrupted(clean, tmp_path / "c", seed=0, corruptions=("fog", "pixelate"),
                              severities=(1, 5))
    assert again == out  # written once
    with pytest.raises(DataError, match="severity folder not found"):
        CorruptedSet(out)  # severities 2-4 are missing
    with pytest.raises(DataError, match="none of the corruptions"):
        CorruptedSet(clean)
