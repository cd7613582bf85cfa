import math

import pytest
import torch

from visionbench.errors import ConfigError
from visionbench.evals.knn import knn_classify, knn_majority, knn_protocol, weighted_votes
from visionbench.results.bootstrap import decode_hits


def unit(angle_deg: float) -> list[float]:
    a = math.radians(angle_deg)
    return [math.cos(a), math.sin(a)]


def test_weighted_vote_equals_the_dino_formula():
    # Training points on the unit circle (scaled: normalisation must not matter).
    angles = [0, 10, 20, 90, 100, 180]
    labels = [0, 0, 1, 1, 2, 2]
    train_x = torch.tensor([[3 * c for c in unit(a)] for a in angles], dtype=torch.float64)
    train_y = torch.tensor(labels)
    test_angles = [5, 15, 60, 140, 175]
    test_x = torch.tensor([unit(a) for a in test_angles], dtype=torch.float64)
    k, t, num_classes = 3, 0.07, 3

    expected_votes, expected_pred = [], []
    for ta in test_angles:
        neighbours = sorted(
            ((math.cos(math.radians(ta - a)), y) for a, y in zip(angles, labels, strict=True)),
            reverse=True)[:k]
        votes = [0.0] * num_classes
        for sim, y in neighbours:
            votes[y] += math.exp(sim / t)
        expected_votes.append(votes)
        expected_pred.append(max(range(num_classes), key=lambda c: votes[c]))
    scores = weighted_votes(train_x, train_y, test_x, num_classes, k, t)
    torch.testing.assert_close(scores, torch.tensor(expected_votes, dtype=torch.float64),
                               rtol=1e-9, atol=0.0)
    test_y = torch.tensor([0, 1, 1, 2, 2])
    hits = [p == y for p, y in zip(expected_pred, test_y.tolist(), strict=True)]
    expected_top1 = 100.0 * sum(hits) / 5
    result = knn_classify(train_x, train_y, test_x, test_y, num_classes, k=k, temperature=t)
    assert result["top1"] == pytest.approx(expected_top1)
    assert 0 < result["top1"] < 100  # the hand-built case has both hits and misses
    assert result["top5"] >= result["top1"]
    assert result["top5"] == pytest.approx(100.0)  # 3 classes: every class is in the top 3


def test_weighted_vote_beats_majority_when_one_neighbour_is_much_closer():
    # One class-0 neighbour at similarity 1.0 and two class-1 at ~0.87: weights exp(s/T)
    # let the single close neighbour win the weighted vote and lose the majority vote.
    train_x = torch.tensor([unit(0), unit(30), unit(-30), unit(180)])
    train_y = torch.tensor([0, 1, 1, 2])
    test_x = torch.tensor([unit(0)])
    test_y = torch.tensor([0])
    weighted = knn_classify(train_x, train_y, test_x, test_y, 3, k=3, temperature=0.07)
    majority = knn_majority(train_x, train_y, test_x, test_y, 3, k=3)
    assert math.exp(1 / 0.07) > 2 * math.exp(math.cos(math.radians(30)) / 0.07)
    assert weighted["top1"] == 100.0
    assert majority["top1"] == 0.0


def test_majority_tie_goes_to_the_class_of_the_nearest_neighbour():
    # k=4: two votes for class 1 and two for class 0; the nearest neighbour is class 1.
    train_x = torch.tensor([unit(1), unit(-5), unit(8), unit(-12), unit(170)])
    train_y = torch.tensor([1, 0, 1, 0, 2])
    test_x = torch.tensor([unit(0)])
    assert knn_majority(train_x, train_y, test_x, torch.tensor([1]), 3, k=4)["top1"] == 100.0
    # Swap which class is nearest: the tie now goes to class 0.
    train_y = torch.tensor([0, 1, 0, 1, 2])
    assert knn_majority(train_x, train_y, test_x, torch.tensor([0]), 3, k=4)["top1"] == 100.0


def test_protocol_keys_and_top5_not_below_top1():
    g = torch.Generator().manual_seed(0)
    train_x, test_x = torch.randn(60, 8, generator=g), torch.randn(30, 8, generator=g)
    train_y = torch.randint(0, 10, (60,), generator=g)
    test_y = torch.randint(0, 10, (30,), generator=g)
    result = knn_protocol(train_x, train_y, test_x, test_y, 10)
    assert set(result) == {"k20_t0.07", "k5_majority"}
    assert result["k20_t0.07"]["top5"] >= result["k20_t0.07"]["top1"]
    chunked = knn_classify(train_x, train_y, test_x, test_y, 10, batch_size=7)
    assert chunked == result["k20_t0.07"]  # samples and intervals too


def test_each_variant_keeps_its_per_sample_hits_and_interval():
    g = torch.Generator().manual_seed(1)
    train_x, test_x = torch.randn(80, 8, generator=g), torch.randn(40, 8, generator=g)
    train_y = torch.randint(0, 4, (80,), generator=g)
    test_y = torch.randint(0, 4, (40,), generator=g)
    result = knn_protocol(train_x, train_y, test_x, test_y, 4, seed=3)
    assert set(result["k20_t0.07"]) == {"top1", "top5", "samples", "ci"}
    assert set(result["k5_majority"]) == {"top1", "samples", "ci"}
    for scores in result.values():
        assert scores["samples"]["n"] == 40
        for metric, (low, high) in scores["ci"].items():
            hits = decode_hits(scores["samples"][metric])
            assert 100.0 * hits.mean() == pytest.approx(scores[metric], abs=1e-4)
            assert low <= scores[metric] <= high
    plain = knn_protocol(train_x, train_y, test_x, test_y, 4, keep_samples=False)
    assert plain["k5_majority"] == {"top1": result["k5_majority"]["top1"]}
    assert knn_protocol(train_x, train_y, test_x, test_y, 4, seed=3) == result


def test_bad_k_is_a_config_error():
    x = torch.randn(4, 2)
    with pytest.raises(ConfigError):
        knn_classify(x, torch.zeros(4, dtype=torch.long), x, torch.zeros(4, dtype=torch.long),
                     2, k=0)
