"""The resize-and-normalization protocol of remote-sensing benchmarks: frozen features at
the native size and resized to the pretraining size, under each input normalization, scored
by kNN and a logistic-regression probe ("Revisiting pre-trained remote sensing model
benchmarks: resizing and normalization matters", Corley et al., arXiv 2305.13456).

Follows isaaccorley/resize-is-all-you-need:

- resize: ``kornia.augmentation.Resize(size)`` (the short side to ``size``, bilinear,
  ``align_corners=True``, no antialiasing) on each batch right before the model
  (``src/utils.py`` ``extract_features``); ``resize`` below calls kornia itself;
- normalizations (``src/datasets/eurosat.py`` ``get_preprocess``, ``run_bigearthnet.py``):
  ``divide`` (x / 10000, SSL4EO's), ``standardize`` (per channel by the data set's train
  split mean / std, ``scripts/compute_eurosat_stats.py``), and ``pretrain`` (the
  statistics the encoder was pretrained with, ImageNet's for an ImageNet model); per-channel
  affine maps commute with bilinear resizing, so their order does not matter;
- kNN (``KNeighborsClassifier(n_neighbors=5)``; ``src/knn.py`` with faiss ``IndexFlatL2``):
  Euclidean distance on the raw pooled features, an unweighted majority of the 5 nearest,
  ties to the lowest class index (``np.argmax(np.bincount(...))``); multi-label
  (BigEarthNet): each label's score is the fraction of the 5 neighbours that carry it
  (``FaissKNNMultilabelClassifier.predict_proba``), scored with micro and macro average
  precision (``average_precision_score``; torchmetrics' implementation here, the same
  step-wise sum);
- the linear probe: ``LogisticRegression(max_iter=3000)`` (C = 1, lbfgs, L2,
  multinomial; ``notebooks/eurosat_training_samples_vs_performance.ipynb``), accuracy.
  For multi-label data (no probe in the official code) one logistic regression per label
  (``OneVsRestClassifier``), scored like kNN;
- ``standard_scale``: the official's optional ``StandardScaler`` of the features, fitted on
  the train features (used for random-init models).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from visionbench.data.multispectral.bands import REFLECTANCE_SCALE
from visionbench.errors import ConfigError
from visionbench.results.bootstrap import hits_samples, map_ci, with_samples

NORMALIZATIONS = ("pretrain", "standardize", "divide")
INTERPOLATION = "bilinear"  # kornia's Resize default (align_corners=True, no antialias)


def resize(images: Tensor, size: int) -> Tensor:
    """``(B, C, H, W)`` with its short side resized to ``size`` as ``K.Resize(size)``."""
    from kornia.augmentation import Resize

    if min(images.shape[-2:]) == size:
        return images
    return Resize(size)(images)


def channel_stats(batches) -> tuple[Tensor, Tensor]:
    """Per-channel mean and std over every pixel of the ``(B, C, H, W)`` image batches of a
    split (an iterable, or one tensor), as ``compute_eurosat_stats.py``
    (``x.mean(dim=(0, 2, 3))``, ``x.std(dim=(0, 2, 3))``, unbiased), accumulated in float64
    batch by batch; a constant band (a zero-padded one) gets std 1, as the official gives its
    padded bands."""
    count, total, squares = 0, None, None
    for x in ([batches] if torch.is_tensor(batches) else batches):
        x = x.double()
        s, q = x.sum(dim=(0, 2, 3)), (x * x).sum(dim=(0, 2, 3))
        total, squares = (s, q) if total is None else (total + s, squares + q)
        count += x.shape[0] * x.shape[2] * x.shape[3]
    if total is None or count < 2:
        raise ConfigError("channel statistics need at least two pixels")
    mean = total / count
    var = ((squares - count * mean * mean) / (count - 1)).clamp_min(0.0)
    std = var.sqrt()
    return mean.float(), torch.where(std > 0, std, torch.ones_like(std)).float()


def normalize(images: Tensor, mode: str, *, data_stats: tuple[Tensor, Tensor] | None = None,
              pretrain_stats: tuple[Sequence[float], Sequence[float]] | None = None,
              pretrain_scale: float = 1.0) -> Tensor:
    """Digital numbers ``(B, C, H, W)`` under one of ``NORMALIZATIONS``: ``divide``
    ``x / 10000``; ``standardize`` ``(x - mean) / std`` with ``data_stats`` (DN units);
    ``pretrain`` ``(x * pretrain_scale - mean) / std`` with ``pretrain_stats``, the encoder's
    own input normalization (e.g. scale 1e-4 and ImageNet's statistics for a model
    pretrained on reflectance)."""
    if mode == "divide":
        return images / REFLECTANCE_SCALE
    if mode == "standardize":
        if data_stats is None:
            raise ConfigError("normalization 'standardize' needs the data set's statistics")
        mean, std = (torch.as_tensor(s, dtype=images.dtype, device=images.device)
                     .view(1, -1, 1, 1) for s in data_stats)
        return (images - mean) / std
    if mode == "pretrain":
        if pretrain_stats is None:
            raise ConfigError("normalization 'pretrain' needs the encoder's pretraining "
                              "statistics")
        mean, std = (torch.as_tensor(s, dtype=images.dtype, device=images.device)
                     .view(1, -1, 1, 1) for s in pretrain_stats)
        if mean.shape[1] != images.shape[1]:
            raise ConfigError(f"pretraining statistics of {mean.shape[1]} channels for "
                              f"{images.shape[1]}-channel images")
        return (images * pretrain_scale - mean) / std
    raise ConfigError(f"normalization {mode!r} (expected one of {', '.join(NORMALIZATIONS)})")


def standard_scale(train_x: Tensor, test_x: Tensor) -> tuple[Tensor, Tensor]:
    """sklearn's ``StandardScaler`` fitted on ``train_x`` (population std; a constant feature
    keeps scale 1)."""
    mean = train_x.double().mean(dim=0)
    std = train_x.double().std(dim=0, unbiased=False)
    std = torch.where(std > 0, std, torch.ones_like(std))
    return ((train_x - mean) / std).float(), ((test_x - mean) / std).float()


def euclidean_neighbours(train_x: Tensor, test_x: Tensor, k: int,
                         batch_size: int = 1024) -> Tensor:
    """Indices ``(B, k)`` of the ``k`` nearest training features in L2 distance, nearest
    first (``topk``; exactly equal distances come in no defined order)."""
    if k < 1 or k > train_x.shape[0]:
        raise ConfigError(f"kNN: k = {k} with {train_x.shape[0]} training samples")
    out = []
    train = train_x.double()
    for start in range(0, test_x.shape[0], batch_size):
        d = torch.cdist(test_x[start:start + batch_size].double(), train)
        out.append(d.topk(k, dim=1, largest=False, sorted=True).indices)
    return torch.cat(out)


def knn_majority_predictions(train_x: Tensor, train_y: Tensor, test_x: Tensor,
                             num_classes: int, k: int = 5) -> Tensor:
    """The unweighted majority class of the ``k`` L2-nearest neighbours, ties to the lowest
    class index: ``(B,)``."""
    neighbours = train_y.long()[euclidean_neighbours(train_x, test_x, k)]
    counts = torch.zeros(neighbours.shape[0], num_classes, dtype=torch.long)
    counts.scatter_add_(1, neighbours, torch.ones_like(neighbours))
    return counts.argmax(dim=1)  # the first maximum: the lowest class


def knn_label_fractions(train_x: Tensor, train_targets: Tensor, test_x: Tensor,
                        k: int = 5) -> Tensor:
    """Multi-label scores ``(B, K)``: the fraction of the ``k`` nearest neighbours that carry
    each label."""
    index = euclidean_neighbours(train_x, test_x, k)
    return train_targets.float()[index].mean(dim=1)


def multilabel_average_precision(scores: Tensor, targets: Tensor, seed: int = 0) -> dict:
    """``{"map_micro", "map_macro", "ci"}`` in percent: average precision of ``scores``
    against the multi-hot ``targets`` over all (sample, label) pairs, and the mean over labels
    of each label's (labels without a positive left out, as sklearn warns and scores them 0 -
    here they are skipped), with their 95 % bootstrap intervals over test samples
    (``results.bootstrap.map_ci``, seeded by ``seed``). The scores themselves are not kept:
    N x C floats, 2.4 million for BigEarthNet's test split."""
    from torchmetrics.functional.classification import binary_average_precision

    targets = targets.long()
    micro = binary_average_precision(scores.flatten().double(), targets.flatten())
    per_label = [binary_average_precision(scores[:, j].double(), targets[:, j])
                 for j in range(targets.shape[1]) if targets[:, j].any()]
    macro = torch.stack(per_label).mean() if per_label else torch.tensor(float("nan"))
    s, t = scores.double().cpu().numpy(), targets.cpu().numpy()
    return {"map_micro": float(micro) * 100.0, "map_macro": float(macro) * 100.0,
            "ci": {f"map_{average}": list(map_ci(s, t, average, seed=seed))
                   for average in ("micro", "macro")}}


def accuracy_with_samples(hits: Tensor, seed: int = 0) -> dict:
    """``{"top1"}`` in percent with its per-sample hits and bootstrap interval."""
    result = {"top1": float(hits.double().mean()) * 100.0}
    return with_samples(result, hits_samples(top1=hits.bool()), seed)


def logistic_probe(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor,
                   multi_label: bool = False, max_iter: int = 3000, seed: int = 0) -> dict:
    """sklearn's ``LogisticRegression(max_iter=3000)``: ``{"top1"}`` (percent, with its
    samples and interval), or for multi-hot targets one per label, ``{"map_micro",
    "map_macro"}``."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier

    x_train, x_test = train_x.double().numpy(), test_x.double().numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # the official's runs warn too
        # a label constant over the training set gets a constant score (sklearn warns)
        warnings.filterwarnings("ignore", message="Label .* is present in all training")
        warnings.filterwarnings("ignore", message="Label not .* is present in all training")
        if multi_label:
            model = OneVsRestClassifier(LogisticRegression(max_iter=max_iter))
            model.fit(x_train, train_y.numpy())
            scores = torch.from_numpy(model.predict_proba(x_test)).double()
            return multilabel_average_precision(scores, test_y, seed)
        model = LogisticRegression(max_iter=max_iter).fit(x_train, train_y.numpy())
        hits = torch.from_numpy(model.predict(x_test) == test_y.numpy())
    return accuracy_with_samples(hits, seed)


def knn_scores(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor,
               num_classes: int, k: int = 5, multi_label: bool = False,
               seed: int = 0) -> dict:
    """kNN-``k`` of one cell: ``{"top1"}`` (percent, with its samples and interval) or
    ``{"map_micro", "map_macro"}``."""
    if multi_label:
        return multilabel_average_precision(knn_label_fractions(train_x, train_y, test_x, k),
                                            test_y, seed)
    predictions = knn_majority_predictions(train_x, train_y, test_x, num_classes, k)
    return accuracy_with_samples(predictions == test_y.long(), seed)


def cell_variant(size: int, native: int, normalization: str,
                 bands: str = "msi") -> dict[str, str]:
    """A grid cell's leaderboard ``variant``: bands (``msi``: all of the data set's, ``rgb``),
    size, interpolation (``none`` at the native size), normalization."""
    return {"bands": bands, "size": str(size),
            "interp": INTERPOLATION if size != native else "none", "norm": normalization}
