"""95% bootstrap intervals over test samples, and the per-sample records they are computed from.

The interval
------------
``bootstrap_ci`` draws ``n_resamples`` (default 1,000) resamples of the N test samples with
replacement, from ``numpy.random.default_rng(seed)``, computes the statistic on every resample
and returns the percentile interval: the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles
(numpy's linear interpolation) of the resampled statistics. All arithmetic is float64. The same
seed and N give the same resample indices whatever the statistic, so the intervals of top-1 and
top-5 (or mIoU and pixel accuracy) of one result come from the same resamples. A statistic that
is undefined on a resample (NaN: an AUROC whose resample holds one class only) is left out of
the quantiles; when every resample is undefined the interval is ``(nan, nan)``.

The statistics are vectorised over resamples: ``statistic`` receives arrays with a leading
resample axis. With ``summed=True`` it receives the per-resample *sums* over samples instead
of the resampled arrays themselves (b x N counts times the per-sample array): the form for
statistics that depend on the samples only through a sum, such as accuracy (mean of hit
indicators) and mIoU (IoU of the summed confusion matrix), and that keeps memory at
O(b x N) for confusion matrices. With ``counted=True`` it receives each resample's counts
(b x N: how often each sample was drawn) and the arrays as they are: the form for statistics
that take sample weights, such as average precision (``map_ci``: the AP of a resample is the
AP with its counts as weights, duplicates being tied scores), which sort once instead of once
a resample.

The metrics (point estimates, vectorised over leading axes)
-----------------------------------------------------------
- ``accuracy(hits)``: percent of true entries along the last axis.
- ``miou(confusion)`` / ``pixel_accuracy(confusion)``: from a (..., C, C) confusion matrix
  (rows label, columns prediction): IoU = diag / (row sum + column sum - diag), mIoU = mean
  over the classes with union > 0 (mmseg's ``nanmean``); pixel accuracy = trace / sum. Percent.
- ``auroc(scores, labels)``: the Mann-Whitney statistic with average ranks for ties (an equal
  positive/negative pair counts one half). Binary: scores and 0/1 labels (..., N). Multi-label
  or one-vs-rest multi-class: scores (..., N, C) with 0/1 targets (..., N, C) or integer labels
  (..., N); the macro average over the classes that have both positives and negatives.
  In [0, 1], not percent (as it is usually reported).
- ``average_precision(scores, targets)``: non-interpolated AP, the definition of scikit-learn's
  ``average_precision_score``: sum over score thresholds of (recall step) x precision, tied
  scores forming one threshold. ``mean_average_precision(scores, targets, average)``: scores and
  0/1 targets (..., N, C); ``"macro"`` is the mean of the per-class APs over classes with at
  least one positive, ``"micro"`` the AP of all (sample, class) pairs pooled. Percent.

Per-sample records in a result JSON (``"samples"``)
---------------------------------------------------
Compact and JSON-friendly, one entry per test sample in test-set order:

- ``{"kind": "hits", "n": N, "top1": "0110...", "top5": "1110..."}``: one character per
  sample, ``"1"`` where the sample's label is in the top-k predictions (top-5 means top
  ``min(5, C)``). Any metric name may carry a hit string (``"top1"`` alone for a majority
  vote). ``decode_hits`` also reads plain lists of 0/1.
- ``{"kind": "confusion", "num_classes": C, "confusion": ["i:count i:count ...", ...]}``:
  one sparse string per test image, its nonzero confusion-matrix cells as
  ``label * C + prediction : pixel count`` (ignored pixels left out). ``decode_confusion``
  also reads dense lists (C*C flat, or C x C nested).
- ``{"kind": "scores", "scores": [[...], ...], "labels": [...]}``: scores (N,) or (N, C) and
  labels (N,) or 0/1 targets (N, C), for AUROC (``"auroc"``) and mAP (``"map_macro"``,
  ``"map_micro"``) of protocols that keep scores.

``ci_from_samples(samples, seed)`` gives ``{metric: [low, high]}`` for any of them; the
protocols store it as ``"ci"`` next to the point estimates, in the same unit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

N_RESAMPLES = 1000
LEVEL = 0.95
# Elements one chunk of resampled data may hold (b x N x per-sample size), to bound memory.
_CHUNK_ELEMENTS = 1 << 22

ArrayLike = Any


def bootstrap_ci(
    per_sample: ArrayLike | Sequence[ArrayLike],
    statistic: Callable[..., np.ndarray],
    n_resamples: int = N_RESAMPLES,
    seed: int = 0,
    level: float = LEVEL,
    *,
    summed: bool = False,
    counted: bool = False,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic`` over resampled test samples.

    ``per_sample``: one array whose first axis is the N samples (hit indicators (N,),
    confusion matrices (N, C, C)), or a tuple of such arrays sharing N (scores and labels),
    resampled together. ``statistic(*arrays)`` receives the resampled arrays with a leading
    resample axis, ``(b, N, ...)``, and returns ``b`` values; with ``summed=True`` it receives
    the per-resample sums over the samples, ``(b, ...)`` (a single array only); with
    ``counted=True``, ``statistic(counts, *arrays)``: the (b, N) float64 counts of each sample
    in each resample and the arrays unresampled. Returns ``(low, high)`` at ``level`` (0.95:
    the 2.5% and 97.5% quantiles) as floats.
    """
    stats = bootstrap_distribution(per_sample, statistic, n_resamples, seed, summed=summed,
                                   counted=counted)
    return percentile_interval(stats, level)


def bootstrap_distribution(
    per_sample: ArrayLike | Sequence[ArrayLike],
    statistic: Callable[..., np.ndarray],
    n_resamples: int = N_RESAMPLES,
    seed: int = 0,
    *,
    summed: bool = False,
    counted: bool = False,
) -> np.ndarray:
    """The ``n_resamples`` resampled values of ``statistic`` (float64), as ``bootstrap_ci``."""
    arrays = _as_arrays(per_sample)
    if summed and len(arrays) != 1:
        raise ValueError("bootstrap: summed=True takes one per-sample array")
    if summed and counted:
        raise ValueError("bootstrap: summed and counted exclude each other")
    if n_resamples < 1:
        raise ValueError(f"bootstrap: n_resamples must be >= 1, got {n_resamples}")
    n = arrays[0].shape[0]
    per_item = max(1, sum(int(np.prod(a.shape[1:], dtype=np.int64)) for a in arrays))
    chunk = max(1, _CHUNK_ELEMENTS // (n * (1 if summed else per_item)))
    rng = np.random.default_rng(seed)
    out = np.empty(n_resamples, dtype=np.float64)
    for start in range(0, n_resamples, chunk):
        b = min(chunk, n_resamples - start)
        index = rng.integers(0, n, size=(b, n))
        if summed or counted:
            offsets = (index + np.arange(b)[:, None] * n).ravel()
            counts = np.bincount(offsets, minlength=b * n).reshape(b, n).astype(np.float64)
        if summed:
            flat = arrays[0].reshape(n, -1)
            sums = (counts @ flat).reshape(b, *arrays[0].shape[1:])
            values = statistic(sums)
        elif counted:
            values = statistic(counts, *arrays)
        else:
            values = statistic(*(a[index] for a in arrays))
        out[start:start + b] = np.asarray(values, dtype=np.float64).reshape(b)
    return out


def percentile_interval(stats: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """The ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of the finite ``stats``."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"bootstrap: level must be in (0, 1), got {level}")
    finite = np.asarray(stats, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return math.nan, math.nan
    low, high = np.quantile(finite, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return float(low), float(high)


def _as_arrays(per_sample: ArrayLike | Sequence[ArrayLike]) -> list[np.ndarray]:
    if isinstance(per_sample, tuple):
        arrays = [np.asarray(a) for a in per_sample]
    else:
        arrays = [np.asarray(per_sample)]
    if not arrays or any(a.ndim == 0 for a in arrays):
        raise ValueError("bootstrap: per-sample arrays need a first axis of samples")
    n = arrays[0].shape[0]
    if n == 0:
        raise ValueError("bootstrap: no samples")
    if any(a.shape[0] != n for a in arrays):
        raise ValueError(f"bootstrap: arrays differ in their number of samples: "
                         f"{[a.shape[0] for a in arrays]}")
    return arrays


# -- metrics ---------------------------------------------------------------------------------


def accuracy(hits: ArrayLike) -> np.ndarray | float:
    """Percent of true entries along the last axis (float64)."""
    hits = np.asarray(hits, dtype=np.float64)
    value = hits.mean(axis=-1) * 100.0
    return float(value) if np.ndim(value) == 0 else value


def miou(confusion: ArrayLike) -> np.ndarray | float:
    """mIoU (percent) of (..., C, C) confusion matrices: the mean IoU over the classes whose
    union is > 0 (NaN when there is none), as mmseg's ``nanmean``."""
    confusion = np.asarray(confusion, dtype=np.float64)
    intersection = np.diagonal(confusion, axis1=-2, axis2=-1)
    union = confusion.sum(axis=-1) + confusion.sum(axis=-2) - intersection
    present = union > 0
    iou = np.divide(intersection, union, out=np.zeros_like(intersection), where=present)
    count = present.sum(axis=-1)
    value = np.divide(iou.sum(axis=-1) * 100.0, count,
                      out=np.full(count.shape, np.nan), where=count > 0)
    return float(value) if np.ndim(value) == 0 else value


def pixel_accuracy(confusion: ArrayLike) -> np.ndarray | float:
    """Correct / labelled pixels (percent) of (..., C, C) confusion matrices."""
    confusion = np.asarray(confusion, dtype=np.float64)
    correct = np.trace(confusion, axis1=-2, axis2=-1)
    total = confusion.sum(axis=(-2, -1))
    value = np.divide(correct * 100.0, total, out=np.full(np.shape(total), np.nan),
                      where=total > 0)
    return float(value) if np.ndim(value) == 0 else value


def _tie_groups(sorted_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For rows sorted along the last axis: each position's first and last index of its run
    of equal values."""
    n = sorted_values.shape[-1]
    positions = np.broadcast_to(np.arange(n), sorted_values.shape)
    starts = np.ones(sorted_values.shape, dtype=bool)
    starts[..., 1:] = sorted_values[..., 1:] != sorted_values[..., :-1]
    ends = np.ones(sorted_values.shape, dtype=bool)
    ends[..., :-1] = starts[..., 1:]
    first = np.maximum.accumulate(np.where(starts, positions, 0), axis=-1)
    last = np.minimum.accumulate(np.where(ends, positions, n)[..., ::-1], axis=-1)[..., ::-1]
    return first, last


def _binary_auroc(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """AUROC along the last axis (average ranks for ties); NaN without both classes."""
    order = np.argsort(scores, axis=-1, kind="stable")
    sorted_scores = np.take_along_axis(scores, order, axis=-1)
    sorted_labels = np.take_along_axis(labels, order, axis=-1)
    first, last = _tie_groups(sorted_scores)
    ranks = (first + last) / 2.0 + 1.0
    positives = sorted_labels.sum(axis=-1)
    negatives = sorted_labels.shape[-1] - positives
    rank_sum = (ranks * sorted_labels).sum(axis=-1)
    u = rank_sum - positives * (positives + 1) / 2.0
    pairs = positives * negatives
    return np.divide(u, pairs, out=np.full(np.shape(pairs), np.nan), where=pairs > 0)


def _binary_ap(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Average precision along the last axis (tied scores: one threshold); NaN without a
    positive."""
    order = np.argsort(-scores, axis=-1, kind="stable")
    sorted_scores = np.take_along_axis(scores, order, axis=-1)
    sorted_targets = np.take_along_axis(targets, order, axis=-1)
    true_positives = np.cumsum(sorted_targets, axis=-1)
    _, last = _tie_groups(sorted_scores)
    precision = np.take_along_axis(true_positives, last, axis=-1) / (last + 1.0)
    positives = sorted_targets.sum(axis=-1)
    total = (sorted_targets * precision).sum(axis=-1)
    return np.divide(total, positives, out=np.full(np.shape(positives), np.nan),
                     where=positives > 0)


class _CountedAP:
    """The average precision (``_binary_ap``) of one score vector under many rows of sample
    counts, from a single sort. A resample's AP is the AP of the scores with each sample's
    count as its weight: a sample drawn k times is k tied entries, and tied entries share one
    threshold. Sorted by score (descending, stable), with ``W(j)`` the counted entries up to
    position j and ``P(j)`` the counted positives, the AP is ``sum over positives i of
    w_i P(g_i) / W(g_i)`` over ``sum w_i``, where ``g_i`` is the last position of i's tie group.

    ``scores`` (M,) and 0/1 ``targets`` (M,) are M entries; ``sample`` (M,) names the sample
    (the column of the counts) of each entry: ``arange(M)`` for one class, ``arange(M) // C``
    for the (sample, class) pairs of a micro average."""

    def __init__(self, scores: np.ndarray, targets: np.ndarray, sample: np.ndarray) -> None:
        order = np.argsort(-scores, kind="stable")
        _, last = _tie_groups(scores[order])
        positive = np.flatnonzero(targets[order] > 0)  # sorted positions of the positives
        self.sample = sample[order]
        self.positive_sample = self.sample[positive]
        self.group_end = last[positive]  # g_i
        # the positives up to g_i: index of the last positive at or before it
        self.positives_to_end = np.searchsorted(positive, self.group_end, side="right") - 1

    def __call__(self, counts: np.ndarray) -> np.ndarray:
        """(b,) APs in [0, 1] for sample counts (b, N); NaN where no positive was drawn."""
        if self.positive_sample.size == 0:
            return np.full(counts.shape[0], np.nan)
        drawn = np.cumsum(counts[:, self.sample], axis=-1)[:, self.group_end]  # W(g_i)
        weight = counts[:, self.positive_sample]  # w_i
        hits = np.cumsum(weight, axis=-1)[:, self.positives_to_end]  # P(g_i)
        precision = hits / np.maximum(drawn, 1.0)  # W(g_i) >= w_i > 0 where it counts
        positives = weight.sum(axis=-1)
        total = (weight * precision).sum(axis=-1)
        return np.divide(total, positives, out=np.full(positives.shape, np.nan),
                         where=positives > 0)


def _counted_map(scores: np.ndarray, targets: np.ndarray,
                 average: str) -> Callable[[np.ndarray], np.ndarray]:
    """``counts (b, N) -> (b,)``: ``mean_average_precision`` (percent) of (N, C) scores and
    0/1 targets for each row of sample counts, the scores sorted once here."""
    n, c = scores.shape
    if average == "micro":
        pooled = _CountedAP(scores.ravel(), targets.ravel(), np.arange(n * c) // c)
        return lambda counts: pooled(counts) * 100.0
    per_class = [_CountedAP(scores[:, j], targets[:, j], np.arange(n)) for j in range(c)]
    return lambda counts: np.asarray(_nanmean_last(
        np.stack([ap(counts) for ap in per_class], axis=-1) * 100.0))


def _class_targets(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """0/1 targets shaped as ``scores`` (..., N, C): integer labels (..., N) one-hot."""
    if labels.shape == scores.shape:
        return labels.astype(np.float64)
    if labels.shape == scores.shape[:-1]:
        classes = np.arange(scores.shape[-1])
        return (labels[..., None] == classes).astype(np.float64)
    raise ValueError(f"labels of shape {labels.shape} do not fit scores {scores.shape}")


def _nanmean_last(values: np.ndarray) -> np.ndarray | float:
    valid = np.isfinite(values)
    count = valid.sum(axis=-1)
    total = np.where(valid, values, 0.0).sum(axis=-1)
    value = np.divide(total, count, out=np.full(np.shape(count), np.nan), where=count > 0)
    return float(value) if np.ndim(value) == 0 else value


def auroc(scores: ArrayLike, labels: ArrayLike, *,
          binary: bool | None = None) -> np.ndarray | float:
    """Area under the ROC curve in [0, 1].

    Binary: scores and 0/1 labels of one shape (..., N). Else the macro average over the
    classes of scores (..., N, C) (0/1 targets (..., N, C) or integer labels (..., N)),
    classes without both positives and negatives left out. ``binary=None`` means binary
    exactly when ``scores`` is 1-D; pass it for stacked (resampled) binary inputs."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    if binary is None:
        binary = scores.ndim == 1
    if binary:
        if labels.shape != scores.shape:
            raise ValueError(f"binary AUROC: labels {labels.shape} vs scores {scores.shape}")
        value = _binary_auroc(scores, labels.astype(np.float64))
        return float(value) if np.ndim(value) == 0 else value
    targets = _class_targets(scores, labels)
    per_class = _binary_auroc(np.swapaxes(scores, -1, -2), np.swapaxes(targets, -1, -2))
    return _nanmean_last(per_class)


def average_precision(scores: ArrayLike, targets: ArrayLike) -> np.ndarray | float:
    """Binary average precision (percent) along the last axis; NaN without a positive."""
    value = _binary_ap(np.asarray(scores, dtype=np.float64),
                       np.asarray(targets, dtype=np.float64)) * 100.0
    return float(value) if np.ndim(value) == 0 else value


def mean_average_precision(scores: ArrayLike, targets: ArrayLike,
                           average: str = "macro") -> np.ndarray | float:
    """Multi-label mAP (percent) of scores (..., N, C) against 0/1 targets (..., N, C) (or
    integer labels (..., N)): ``"macro"`` the mean of per-class APs over classes with a
    positive, ``"micro"`` the AP of every (sample, class) pair pooled."""
    scores = np.asarray(scores, dtype=np.float64)
    targets = _class_targets(scores, np.asarray(targets))
    if average == "micro":
        lead = scores.shape[:-2]
        value = _binary_ap(scores.reshape(*lead, -1), targets.reshape(*lead, -1)) * 100.0
        return float(value) if np.ndim(value) == 0 else value
    if average != "macro":
        raise ValueError(f"mAP: average must be 'macro' or 'micro', got {average!r}")
    per_class = _binary_ap(np.swapaxes(scores, -1, -2), np.swapaxes(targets, -1, -2)) * 100.0
    return _nanmean_last(per_class)


# -- intervals of the metrics ----------------------------------------------------------------


def accuracy_ci(hits: ArrayLike, n_resamples: int = N_RESAMPLES, seed: int = 0,
                level: float = LEVEL) -> tuple[float, float]:
    """Interval of the accuracy (percent) of per-sample hit indicators (N,)."""
    hits = np.asarray(hits, dtype=np.float64)
    n = hits.shape[0]
    return bootstrap_ci(hits, lambda sums: sums * (100.0 / n), n_resamples, seed, level,
                        summed=True)


def confusion_ci(confusion: ArrayLike, n_resamples: int = N_RESAMPLES, seed: int = 0,
                 level: float = LEVEL) -> dict[str, tuple[float, float]]:
    """Intervals of mIoU and pixel accuracy (percent) from per-image confusion matrices
    (N, C, C): each resample's matrices are summed, then scored."""
    confusion = np.asarray(confusion, dtype=np.float64)
    stats = {"miou": miou, "pixel_acc": pixel_accuracy}
    return {name: bootstrap_ci(confusion, fn, n_resamples, seed, level, summed=True)
            for name, fn in stats.items()}


def miou_ci(confusion: ArrayLike, n_resamples: int = N_RESAMPLES, seed: int = 0,
            level: float = LEVEL) -> tuple[float, float]:
    """Interval of the mIoU (percent) of per-image confusion matrices (N, C, C)."""
    return bootstrap_ci(np.asarray(confusion, dtype=np.float64), miou, n_resamples, seed,
                        level, summed=True)


def auroc_ci(scores: ArrayLike, labels: ArrayLike, n_resamples: int = N_RESAMPLES,
             seed: int = 0, level: float = LEVEL) -> tuple[float, float]:
    """Interval of ``auroc(scores, labels)`` over resampled samples (binary when ``scores``
    is 1-D)."""
    scores = np.asarray(scores, dtype=np.float64)
    binary = scores.ndim == 1
    return bootstrap_ci((scores, np.asarray(labels)),
                        lambda s, y: auroc(s, y, binary=binary), n_resamples, seed, level)


def map_ci(scores: ArrayLike, targets: ArrayLike, average: str = "macro",
           n_resamples: int = N_RESAMPLES, seed: int = 0,
           level: float = LEVEL) -> tuple[float, float]:
    """Interval of ``mean_average_precision(scores, targets, average)`` over resamples
    (scores (N, C) and 0/1 targets (N, C) or integer labels (N,)). Each resample is scored as
    the AP under its sample counts (``_CountedAP``), from one sort of the scores: the same
    values as scoring the resampled arrays, 11 - 14x faster at 10,000 x 19 on 2 CPU cores
    (``benchmarks/bootstrap_map.py``)."""
    if average not in ("macro", "micro"):
        raise ValueError(f"mAP: average must be 'macro' or 'micro', got {average!r}")
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2:
        raise ValueError(f"mAP interval: scores (N, C) expected, got {scores.shape}")
    targets = _class_targets(scores, np.asarray(targets))
    statistic = _counted_map(scores, targets, average)
    return bootstrap_ci((scores, targets), lambda counts, *_: statistic(counts),
                        n_resamples, seed, level, counted=True)


# -- per-sample records ----------------------------------------------------------------------


def encode_hits(hits: ArrayLike) -> str:
    """``"0110..."``: one character per sample."""
    flat = np.asarray(hits).astype(bool).ravel()
    return (flat.astype(np.uint8) + ord("0")).tobytes().decode("ascii")


def decode_hits(encoded: str | Sequence[Any]) -> np.ndarray:
    """Boolean hit indicators from ``encode_hits``'s string or a list of 0/1 / booleans."""
    if isinstance(encoded, str):
        raw = np.frombuffer(encoded.encode("ascii"), dtype=np.uint8)
        if raw.size and not np.isin(raw, (ord("0"), ord("1"))).all():
            raise ValueError("hit string: expected only '0' and '1'")
        return raw == ord("1")
    return np.asarray(encoded).astype(bool).ravel()


def hits_samples(**hits: ArrayLike) -> dict:
    """The ``"samples"`` record of hit indicators: ``hits_samples(top1=..., top5=...)``."""
    encoded = {name: encode_hits(values) for name, values in hits.items()}
    lengths = {len(text) for text in encoded.values()}
    if len(lengths) > 1:
        raise ValueError(f"hits: metrics differ in their number of samples: {lengths}")
    return {"kind": "hits", "n": lengths.pop() if lengths else 0, **encoded}


def encode_confusion(matrix: ArrayLike) -> str:
    """One image's confusion matrix (C, C) as its nonzero cells, ``"index:count ..."``."""
    flat = np.asarray(matrix).astype(np.int64).ravel()
    nonzero = np.flatnonzero(flat)
    return " ".join(f"{i}:{flat[i]}" for i in nonzero)


def decode_confusion(encoded: Sequence[Any], num_classes: int) -> np.ndarray:
    """(N, C, C) int64 matrices from sparse strings, or from dense flat / nested lists."""
    out = np.zeros((len(encoded), num_classes * num_classes), dtype=np.int64)
    for row, item in enumerate(encoded):
        if isinstance(item, str):
            for cell in item.split():
                index, count = cell.split(":")
                out[row, int(index)] = int(count)
        else:
            out[row] = np.asarray(item, dtype=np.int64).ravel()
    return out.reshape(len(encoded), num_classes, num_classes)


def confusion_samples(confusion: ArrayLike) -> dict:
    """The ``"samples"`` record of per-image confusion matrices (N, C, C)."""
    confusion = np.asarray(confusion)
    if confusion.ndim != 3 or confusion.shape[1] != confusion.shape[2]:
        raise ValueError(f"confusion: expected (N, C, C), got {confusion.shape}")
    return {"kind": "confusion", "num_classes": int(confusion.shape[1]),
            "confusion": [encode_confusion(m) for m in confusion]}


def scores_samples(scores: ArrayLike, labels: ArrayLike) -> dict:
    """The ``"samples"`` record of scores (N,) / (N, C) and labels / 0/1 targets."""
    return {"kind": "scores", "scores": np.asarray(scores, dtype=np.float64).tolist(),
            "labels": np.asarray(labels).tolist()}


def ci_from_samples(samples: dict, seed: int | None = 0, n_resamples: int = N_RESAMPLES,
                    level: float = LEVEL) -> dict[str, list[float]]:
    """``{metric: [low, high]}`` for every metric a ``"samples"`` record supports: its hit
    strings (accuracy), ``miou`` and ``pixel_acc`` of confusion matrices, ``auroc`` of binary
    scores, ``auroc``, ``map_macro`` and ``map_micro`` of class scores. An empty or unknown
    record gives ``{}``. ``seed`` None means 0."""
    seed = 0 if seed is None else int(seed)
    kind = samples.get("kind") if isinstance(samples, dict) else None
    out: dict[str, tuple[float, float]] = {}
    if kind == "hits":
        for name, value in samples.items():
            if name in ("kind", "n") or not isinstance(value, str | list):
                continue
            hits = decode_hits(value)
            if hits.size:
                out[name] = accuracy_ci(hits, n_resamples, seed, level)
    elif kind == "confusion" and samples.get("confusion"):
        matrices = decode_confusion(samples["confusion"], int(samples["num_classes"]))
        out.update(confusion_ci(matrices, n_resamples, seed, level))
    elif kind == "scores" and samples.get("scores"):
        scores = np.asarray(samples["scores"], dtype=np.float64)
        labels = np.asarray(samples["labels"])
        out["auroc"] = auroc_ci(scores, labels, n_resamples, seed, level)
        if scores.ndim == 2:
            for average in ("macro", "micro"):
                out[f"map_{average}"] = map_ci(scores, labels, average, n_resamples, seed,
                                               level)
    return {name: [low, high] for name, (low, high) in out.items()}


def with_samples(result: dict, samples: dict, seed: int | None) -> dict:
    """``result`` with ``"samples"`` and their ``"ci"`` added (in place; returned)."""
    result["samples"] = samples
    result["ci"] = ci_from_samples(samples, seed)
    return result
