"""Bootstrap intervals over test samples and the metric formulas they resample."""

import itertools

import numpy as np
import pytest

from visionbench.results import bootstrap as b


def hits(n: int, rate: float = 0.7, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random(n) < rate


def test_interval_contains_the_estimate_and_shrinks_with_more_samples():
    small, large = hits(100), hits(10_000)
    low_s, high_s = b.accuracy_ci(small)
    low_l, high_l = b.accuracy_ci(large)
    assert low_s <= b.accuracy(small) <= high_s
    assert low_l <= b.accuracy(large) <= high_l
    assert (high_l - low_l) < (high_s - low_s) / 5  # ~ 1/sqrt(100) of the width
    # a binomial 95% interval at p=0.7: about +-1.96 sqrt(p(1-p)/n) = +-9 points for n=100
    assert 12.0 < high_s - low_s < 24.0


def test_seeded_and_deterministic():
    x = hits(300)
    assert b.accuracy_ci(x, seed=1) == b.accuracy_ci(x, seed=1)
    assert b.accuracy_ci(x, seed=1) != b.accuracy_ci(x, seed=2)
    # the general path (resampled arrays) and the summed path (counts) draw the same resamples
    general = b.bootstrap_ci(x.astype(float), lambda r: r.mean(axis=-1) * 100, seed=1)
    assert general == pytest.approx(b.accuracy_ci(x, seed=1), abs=1e-9)


def test_interval_of_a_constant_and_of_undefined_resamples():
    assert b.accuracy_ci(np.ones(50, dtype=bool)) == (100.0, 100.0)
    # one positive in 30: many resamples miss it and have no AUROC; they are left out
    labels = np.zeros(30, dtype=int)
    labels[0] = 1
    low, high = b.auroc_ci(np.linspace(0, 1, 30), labels)
    assert low == high == pytest.approx(0.0)
    assert all(np.isnan(b.percentile_interval(np.array([np.nan, np.nan]))))
    with pytest.raises(ValueError, match="no samples"):
        b.accuracy_ci(np.array([], dtype=bool))


def test_miou_and_pixel_accuracy_from_summed_per_image_matrices():
    confusion = np.array([[[3, 1, 0], [0, 2, 0], [0, 0, 0]],
                          [[1, 0, 0], [2, 4, 0], [0, 0, 0]]])  # class 2 absent
    total = confusion.sum(0).astype(np.float64)
    iou = [total[c, c] / (total[c].sum() + total[:, c].sum() - total[c, c]) for c in (0, 1)]
    assert b.miou(total) == pytest.approx(100 * sum(iou) / 2, rel=1e-15)
    assert b.pixel_accuracy(total) == pytest.approx(100 * 10 / 13, rel=1e-15)
    assert np.allclose(b.miou(confusion), [100 * (3 / 4 + 2 / 3) / 2, 100 * (1 / 3 + 4 / 6) / 2])
    ci = b.confusion_ci(confusion)
    assert set(ci) == {"miou", "pixel_acc"}
    assert ci["miou"][0] <= b.miou(total) <= ci["miou"][1]


def reference_auroc(scores, labels) -> float:
    pos = [s for s, y in zip(scores, labels, strict=True) if y]
    neg = [s for s, y in zip(scores, labels, strict=True) if not y]
    wins = sum((p > n) + 0.5 * (p == n) for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def reference_ap(scores, targets) -> float:
    """scikit-learn's average_precision_score: sum of recall steps x precision over the
    distinct thresholds, in percent."""
    positives, total, previous = sum(targets), 0.0, 0.0
    for threshold in sorted(set(scores), reverse=True):
        chosen = [t for s, t in zip(scores, targets, strict=True) if s >= threshold]
        recall = sum(chosen) / positives
        total += (recall - previous) * sum(chosen) / len(chosen)
        previous = recall
    return 100.0 * total


def test_auroc_matches_the_pairwise_formula_with_ties():
    rng = np.random.default_rng(0)
    scores = np.round(rng.random(40), 1)  # many ties
    labels = (rng.random(40) < 0.4).astype(int)
    assert b.auroc(scores, labels) == pytest.approx(reference_auroc(scores, labels), abs=1e-15)
    assert b.auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75
    low, high = b.auroc_ci(scores, labels)
    assert low <= b.auroc(scores, labels) <= high
    # one-vs-rest of integer labels, and stacked binary rows (as resamples are)
    class_scores = rng.random((30, 3))
    class_labels = np.arange(30) % 3
    expected = np.mean([reference_auroc(class_scores[:, c], class_labels == c) for c in range(3)])
    assert b.auroc(class_scores, class_labels) == pytest.approx(expected, abs=1e-15)
    stacked = b.auroc(np.stack([scores, scores[::-1]]), np.stack([labels, labels[::-1]]),
                      binary=True)
    assert np.allclose(stacked, reference_auroc(scores, labels))


def test_map_macro_and_micro_match_the_reference():
    rng = np.random.default_rng(1)
    scores = np.round(rng.random((25, 4)), 1)
    targets = (rng.random((25, 4)) < 0.4).astype(int)
    targets[:, 3] = 0  # a class without positives is left out of the macro mean
    macro = np.mean([reference_ap(scores[:, c], targets[:, c]) for c in range(3)])
    micro = reference_ap(scores.ravel().tolist(), targets.ravel().tolist())
    assert b.mean_average_precision(scores, targets) == pytest.approx(macro, abs=1e-12)
    assert b.mean_average_precision(scores, targets, "micro") == pytest.approx(micro, abs=1e-12)
    assert b.average_precision([0.9, 0.8, 0.7], [1, 0, 1]) == pytest.approx(100 * (1 + 2 / 3) / 2)
    for average in ("macro", "micro"):
        low, high = b.map_ci(scores, targets, average, n_resamples=200)
        assert low <= b.mean_average_precision(scores, targets, average) <= high


@pytest.mark.parametrize("average", ["macro", "micro"])
def test_map_interval_from_counts_equals_scoring_the_resampled_arrays(average):
    rng = np.random.default_rng(5)
    scores = np.round(rng.random((60, 5)), 1)  # ties within a class and across pairs
    targets = (rng.random((60, 5)) < 0.3).astype(int)
    targets[:, 4] = 0
    targets[7, 4] = 1  # one positive: about a third of the resamples leave the class out
    resampled = b.bootstrap_distribution(
        (scores, targets), lambda s, t: b.mean_average_precision(s, t, average), 300, seed=2)
    counted = b.bootstrap_distribution(
        (scores, targets), lambda counts, *_: b._counted_map(scores, targets, average)(counts),
        300, seed=2, counted=True)
    assert np.allclose(counted, resampled, rtol=0, atol=1e-10)
    assert b.map_ci(scores, targets, average, n_resamples=300, seed=2) == pytest.approx(
        b.percentile_interval(resampled), abs=1e-10)
    # counts of 0 / 1 leave out / keep a sample: the AP of the kept rows
    keep = np.zeros((1, 60))
    keep[0, ::2] = 1
    value = b._counted_map(scores, targets, average)(keep)[0]
    assert value == pytest.approx(b.mean_average_precision(scores[::2], targets[::2], average),
                                  abs=1e-12)
    with pytest.raises(ValueError, match="exclude"):
        b.bootstrap_distribution(scores, np.mean, summed=True, counted=True)


def test_samples_records_round_trip_and_give_intervals():
    top1, top5 = hits(60, 0.5), hits(60, 0.9, seed=1)
    record = b.hits_samples(top1=top1, top5=top5 | top1)
    assert record["n"] == 60 and set(record["top1"]) <= {"0", "1"}
    assert np.array_equal(b.decode_hits(record["top1"]), top1)
    assert np.array_equal(b.decode_hits([1, 0, 1]), [True, False, True])
    ci = b.ci_from_samples(record, seed=4)
    assert ci["top1"] == list(b.accuracy_ci(top1, seed=4))
    confusion = np.random.default_rng(2).integers(0, 5, size=(7, 3, 3)) * (
        np.random.default_rng(3).random((7, 3, 3)) < 0.5)
    record = b.confusion_samples(confusion)
    assert np.array_equal(b.decode_confusion(record["confusion"], 3), confusion)
    assert np.array_equal(b.decode_confusion(confusion.reshape(7, 9).tolist(), 3), confusion)
    assert set(b.ci_from_samples(record)) == {"miou", "pixel_acc"}
    scores = b.scores_samples(np.linspace(0, 1, 20), np.arange(20) % 2)
    assert set(b.ci_from_samples(scores)) == {"auroc"}
    assert b.ci_from_samples({}) == {}
