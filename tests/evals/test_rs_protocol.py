"""The resize-and-normalization protocol's pieces against hand-computed cases, sklearn and
their formulas."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from visionbench.errors import ConfigError
from visionbench.evals.rs_protocol import (
    cell_variant,
    channel_stats,
    knn_label_fractions,
    knn_majority_predictions,
    knn_scores,
    logistic_probe,
    multilabel_average_precision,
    normalize,
    resize,
    standard_scale,
)
from visionbench.results.bootstrap import map_ci


def test_multilabel_average_precision_by_hand_and_against_sklearn():
    from sklearn.metrics import average_precision_score

    scores = torch.tensor([[0.8, 0.2], [0.6, 0.4], [0.2, 0.6]])
    targets = torch.tensor([[1, 0], [0, 1], [1, 1]])
    result = multilabel_average_precision(scores, targets)
    # label 0: hits at ranks 1 and 3 -> (1 + 2/3) / 2; label 1: ranks 1 and 2 -> 1
    assert result["map_macro"] == pytest.approx(100 * (5 / 6 + 1) / 2)
    # pooled pairs, ties at 0.6 and 0.2 taken as one threshold each:
    # precision 1, 2/3, 3/4, 4/6 at recall 1/4, 2/4, 3/4, 1
    assert result["map_micro"] == pytest.approx(100 * (1 + 2 / 3 + 3 / 4 + 4 / 6) / 4)
    rng = np.random.default_rng(0)
    s, t = rng.uniform(size=(40, 6)), rng.integers(0, 2, (40, 6))
    ours = multilabel_average_precision(torch.from_numpy(s), torch.from_numpy(t))
    assert ours["map_micro"] == pytest.approx(100 * average_precision_score(t, s, average="micro"))
    assert ours["map_macro"] == pytest.approx(100 * average_precision_score(t, s, average="macro"))
    # the intervals: 95 % bootstrap over the 40 test samples, seeded, around the estimates
    for average in ("micro", "macro"):
        low, high = ours["ci"][f"map_{average}"]
        assert low < ours[f"map_{average}"] < high
        assert [low, high] == list(map_ci(s, t, average, seed=0))
    again = multilabel_average_precision(torch.from_numpy(s), torch.from_numpy(t), seed=1)
    assert again["ci"] != ours["ci"] and again["map_micro"] == ours["map_micro"]


def test_knn_majority_is_euclidean_with_ties_to_the_lowest_class():
    from sklearn.neighbors import KNeighborsClassifier

    train = torch.tensor([[0.0], [1.0], [2.0], [10.0], [11.0]])
    labels = torch.tensor([2, 1, 1, 0, 0])
    assert knn_majority_predictions(train, labels, torch.tensor([[0.9]]), 3, k=3).item() == 1
    # a 1-1 tie between the nearest (class 2) and the next (class 1): the lower class wins
    assert knn_majority_predictions(train, labels, torch.tensor([[0.4]]), 3, k=2).item() == 1
    # Euclidean, not cosine: (10, 0) is nearer (9, 0) than (1, 0), whatever the angles
    far = torch.tensor([[1.0, 0.0], [10.0, 0.0]])
    assert knn_majority_predictions(far, torch.tensor([0, 1]), torch.tensor([[9.0, 1.0]]), 2,
                                    k=1).item() == 1
    rng = np.random.default_rng(1)
    x, y, q = rng.normal(size=(60, 8)), rng.integers(0, 4, 60), rng.normal(size=(25, 8))
    expected = KNeighborsClassifier(n_neighbors=5).fit(x, y).predict(q)
    ours = knn_majority_predictions(torch.from_numpy(x), torch.from_numpy(y),
                                    torch.from_numpy(q), 4, k=5)
    assert ours.tolist() == expected.tolist()
    with pytest.raises(ConfigError, match="k = 9"):
        knn_majority_predictions(train, labels, train, 3, k=9)


def test_multilabel_knn_scores_are_the_neighbours_label_fractions():
    train = torch.tensor([[0.0], [1.0], [2.0], [9.0]])
    targets = torch.tensor([[1, 0, 1], [1, 1, 0], [0, 1, 0], [0, 0, 1]])
    fractions = knn_label_fractions(train, targets, torch.tensor([[0.1], [8.0]]), k=2)
    assert torch.allclose(fractions, torch.tensor([[1.0, 0.5, 0.5], [0.0, 0.5, 0.5]]))
    result = knn_scores(train, targets, train, targets, 3, k=1, multi_label=True)
    assert result == {"map_micro": pytest.approx(100.0), "map_macro": pytest.approx(100.0),
                      "ci": {"map_micro": [100.0, 100.0], "map_macro": [100.0, 100.0]}}


def test_normalizations_against_their_formulas():
    x = torch.rand(2, 3, 4, 4) * 5000
    mean, std = torch.tensor([100.0, 200.0, 300.0]), torch.tensor([10.0, 20.0, 30.0])
    assert torch.allclose(normalize(x, "divide"), x / 10000)
    assert torch.allclose(normalize(x, "standardize", data_stats=(mean, std)),
                          (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1))
    imagenet = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    expected = (x / 10000 - torch.tensor(imagenet[0]).view(1, 3, 1, 1)) / torch.tensor(
        imagenet[1]).view(1, 3, 1, 1)
    assert torch.allclose(normalize(x, "pretrain", pretrain_stats=imagenet, pretrain_scale=1e-4),
                          expected, atol=1e-5)
    with pytest.raises(ConfigError, match="expected one of pretrain, standardize, divide"):
        normalize(x, "minmax")
    with pytest.raises(ConfigError, match="3-channel"):
        normalize(x, "pretrain", pretrain_stats=([0.5], [0.5]))
    padded = torch.cat([x, torch.zeros(2, 1, 4, 4)], dim=1)
    assert channel_stats(padded)[1][-1] == 1.0  # a zero-padded band keeps scale 1
    batched = channel_stats([x[:1], x[1:]])  # accumulated batch by batch
    m, s = channel_stats(x)
    assert torch.allclose(batched[0], m) and torch.allclose(batched[1], s)
    flat = x.permute(1, 0, 2, 3).reshape(3, -1).double().numpy()
    assert np.allclose(m.numpy(), flat.mean(axis=1)) and np.allclose(
        s.numpy(), flat.std(axis=1, ddof=1), rtol=1e-5)


def test_resize_is_kornias_bilinear_with_aligned_corners():
    x = torch.rand(2, 13, 64, 64)
    out = resize(x, 224)
    assert out.shape == (2, 13, 224, 224)
    assert torch.allclose(out, F.interpolate(x, size=(224, 224), mode="bilinear",
                                             align_corners=True), atol=1e-5)
    assert resize(x, 64) is x  # the native size is left alone
    assert resize(torch.rand(1, 3, 32, 48), 64).shape == (1, 3, 64, 96)  # the short side
    assert cell_variant(224, 64, "divide") == {"bands": "msi", "size": "224",
                                               "interp": "bilinear", "norm": "divide"}
    assert cell_variant(64, 64, "divide")["interp"] == "none"


def test_standard_scale_and_the_logistic_probe():
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(2)
    train, test = rng.normal(3, 2, (50, 4)), rng.normal(3, 2, (10, 4))
    train[:, 3] = 1.0  # a constant feature keeps scale 1
    a, b = standard_scale(torch.from_numpy(train), torch.from_numpy(test))
    scaler = StandardScaler().fit(train)
    assert np.allclose(a.numpy(), scaler.transform(train), atol=1e-5)
    assert np.allclose(b.numpy(), scaler.transform(test), atol=1e-5)
    centres = torch.tensor([[0.0, 0.0], [5.0, 5.0], [0.0, 5.0]])
    y = torch.arange(3).repeat(20)
    x = centres[y] + 0.3 * torch.randn(60, 2, generator=torch.Generator().manual_seed(0))
    probe = logistic_probe(x, y, x, y)
    assert probe["top1"] == pytest.approx(100.0) and probe["samples"]["n"] == 60
    assert probe["ci"]["top1"] == [100.0, 100.0]
    never, always = torch.zeros_like(y, dtype=torch.bool), torch.ones_like(y, dtype=torch.bool)
    multi = torch.stack([y == 0, y != 1, never, always], 1).long()
    result = logistic_probe(x, multi, x, multi, multi_label=True)
    # a label in every training sample is scored as certain, not dropped to the bottom
    assert result["map_micro"] == pytest.approx(100.0)
    assert result["map_macro"] == pytest.approx(100.0)
    assert result["ci"] == {"map_micro": [100.0, 100.0], "map_macro": [100.0, 100.0]}
