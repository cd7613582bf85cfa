"""SSL4EO-S12's linear protocol: the step schedule, the transforms' sizes,
single- and multi-label training on separable band means, and bad input."""

import pytest
import torch

from visionbench.errors import ConfigError
from visionbench.evals.ssl4eo_linear import (
    LinearSpec,
    random_subset_indices,
    step_lr,
    train_linear,
    transforms,
)


def band_means(images):
    return images.mean(dim=(2, 3))


def dataset(n, multi_label, seed):
    g = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(n):
        if multi_label:
            label = (torch.rand(3, generator=g) < 0.5).float()
            means = label * 2 - 1
        else:
            label = torch.tensor(i % 3)
            means = torch.nn.functional.one_hot(label, 3).float() * 2 - 1
        image = means.view(3, 1, 1) + 0.3 * torch.randn(3, 20, 20, generator=g)
        samples.append({"image": image, "label": label})
    return samples


def test_step_schedule_as_adjust_learning_rate():
    assert step_lr(0.05, 0, (60, 80)) == 0.05
    assert step_lr(0.05, 59, (60, 80)) == 0.05
    assert step_lr(0.05, 60, (60, 80)) == pytest.approx(0.005)
    assert step_lr(0.05, 99, (60, 80)) == pytest.approx(0.0005)


def test_the_label_fraction_is_the_official_draw_with_replacement():
    import numpy as np

    picks = random_subset_indices(1000, 0.1, seed=42)
    assert picks == np.random.default_rng(42).choice(range(1000), 100).tolist()
    assert len(picks) == 100 and len(set(picks)) < 100  # drawn with replacement
    assert random_subset_indices(7, 1.0) == list(range(7))
    with pytest.raises(ConfigError, match="keeps none"):
        random_subset_indices(5, 0.1)


def test_milestones_and_crop_scales_are_validated():
    from pydantic import ValidationError

    from visionbench.config import SoftConLinearConfig

    with pytest.raises(ValidationError, match="would never step"):
        SoftConLinearConfig(epochs=50)
    with pytest.raises(ValidationError, match="crop scale"):
        SoftConLinearConfig(eurosat_crop_scale=(0.9, 0.1))


def test_transform_sizes_keep_the_official_ratio():
    train, test = transforms(LinearSpec(size=28))
    x = torch.rand(13, 40, 50)
    assert train(x).shape == (13, 28, 28)
    assert test(x).shape == (13, 28, 28)
    # Resize(256) + CenterCrop(224) at 224: the test crop is the central 224 / 256
    _, test224 = transforms(LinearSpec(size=224))
    assert test224(torch.rand(2, 120, 120)).shape == (2, 224, 224)


@pytest.mark.parametrize("multi_label", [False, True])
def test_a_separable_problem_is_learned(multi_label):
    spec = LinearSpec(epochs=30, batch_size=16, milestones=(20, 25), size=16, lr=0.5,
                      crop_scale=(0.5, 1.0), seed=0)
    logs = []
    result = train_linear(band_means, 3, dataset(64, multi_label, 0),
                          dataset(30, multi_label, 1), 3, multi_label, spec, log=logs.append)
    if multi_label:
        assert set(result) == {"map_micro", "map_macro", "ci"} and result["map_micro"] > 95
        assert result["ci"]["map_micro"][0] <= result["map_micro"] <= result["ci"]["map_micro"][1]
    else:
        assert result["top1"] > 95
    assert logs[0].startswith("  linear epoch 1/30") and "30/30" in logs[-1]


def test_a_split_smaller_than_the_batch_trains_on_all_of_it():
    spec = LinearSpec(epochs=2, batch_size=256, size=16, seed=0)
    result = train_linear(band_means, 3, dataset(10, False, 0), dataset(6, False, 1), 3,
                          False, spec, log=lambda _: None)
    assert 0 <= result["top1"] <= 100


def test_bad_input():
    with pytest.raises(ConfigError, match="empty train or test"):
        train_linear(band_means, 3, [], dataset(3, False, 0), 3, False, LinearSpec(size=16))
    with pytest.raises(ConfigError, match="must be positive"):
        LinearSpec(epochs=0)
