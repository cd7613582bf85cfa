"""k-nearest-neighbour classification of frozen features.

Follows facebookresearch/dino ``eval_knn.py`` (``knn_classifier``): features are
L2-normalised, neighbours are the k training features of highest cosine similarity, each
votes for its class with weight ``exp(similarity / T)``, classes are ranked by summed
votes; top-5 looks at ``min(5, k)`` ranked classes (fewer when there are fewer classes).
``knn_majority`` is the plain, unweighted vote.

With ``keep_samples`` (the default) each result also holds its per-sample test hits,
``"samples": {"kind": "hits", "n", "top1": "0110...", ...}``, and their 95% bootstrap
intervals ``"ci": {"top1": [low, high], ...}`` (1,000 resamples seeded by ``seed``; see
``visionbench.results.bootstrap``); the metric keys stay the plain numbers they were.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy

from visionbench.errors import ConfigError
from visionbench.evals.linear_probe import topk_hits
from visionbench.results.bootstrap import hits_samples, with_samples


def check_knn_inputs(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor,
                     k: int, protocol: str = "knn") -> None:
    """Frozen (N, D) features and their labels, as a feature protocol (named in the
    errors) needs them."""
    if k < 1:
        raise ConfigError(f"{protocol}: k must be >= 1, got {k}")
    if train_x.ndim != 2 or test_x.ndim != 2 or train_x.shape[1] != test_x.shape[1]:
        raise ConfigError(f"{protocol}: expected (N, D) train and test features, got "
                          f"{tuple(train_x.shape)} and {tuple(test_x.shape)}")
    if train_x.shape[0] != train_y.shape[0] or test_x.shape[0] != test_y.shape[0]:
        raise ConfigError(f"{protocol}: features and labels differ in length")
    if train_x.shape[0] == 0 or test_x.shape[0] == 0:
        raise ConfigError(f"{protocol}: empty train or test features")


def nearest_neighbours(train_x: Tensor, test_x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Cosine similarities (B, k) and train indices (B, k), nearest first."""
    similarity = F.normalize(test_x, dim=1) @ F.normalize(train_x, dim=1).T
    return similarity.topk(min(k, train_x.shape[0]), dim=1, largest=True, sorted=True)


def weighted_votes(train_x: Tensor, train_y: Tensor, test_x: Tensor, num_classes: int,
                   k: int = 20, temperature: float = 0.07) -> Tensor:
    """Class scores (B, C): the sum over the k nearest neighbours of ``exp(sim / T)``,
    each added to its neighbour's class."""
    similarity, index = nearest_neighbours(train_x, test_x, k)
    votes = F.one_hot(train_y[index], num_classes).to(similarity.dtype)  # (B, k, C)
    return (votes * (similarity / temperature).exp().unsqueeze(-1)).sum(dim=1)


def chunks(test_x: Tensor, test_y: Tensor, batch_size: int):
    for start in range(0, test_x.shape[0], batch_size):
        yield test_x[start:start + batch_size], test_y[start:start + batch_size]


@torch.no_grad()
def knn_classify(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor,
                 num_classes: int, k: int = 20, temperature: float = 0.07,
                 batch_size: int = 1024, *, keep_samples: bool = True, seed: int = 0) -> dict:
    """DINO's temperature-weighted kNN vote: ``{"top1", "top5"}`` in percent (and
    ``"samples"`` / ``"ci"`` with ``keep_samples``)."""
    check_knn_inputs(train_x, train_y, test_x, test_y, k)
    device = train_x.device
    train_x, train_y = train_x.float(), train_y.long()
    top_k = min(5, k, num_classes)
    top1 = accuracy_metric(num_classes, 1, device)
    top5 = accuracy_metric(num_classes, top_k, device)
    hits1, hits5 = [], []
    for x, y in chunks(test_x.float().to(device), test_y.long().to(device), batch_size):
        scores = weighted_votes(train_x, train_y, x, num_classes, k, temperature)
        top1.update(scores, y)
        top5.update(scores, y)
        if keep_samples:
            hits1.append(topk_hits(scores, y, 1))
            hits5.append(topk_hits(scores, y, top_k))
    result = {"top1": float(top1.compute()) * 100.0, "top5": float(top5.compute()) * 100.0}
    if keep_samples:
        with_samples(result, hits_samples(top1=torch.cat(hits1), top5=torch.cat(hits5)), seed)
    return result


def accuracy_metric(num_classes: int, top_k: int, device) -> MulticlassAccuracy:
    """Sample-averaged top-k accuracy, accumulated over chunks by torchmetrics."""
    # Local to this process: never gathered across DDP ranks.
    metric = MulticlassAccuracy(num_classes, top_k=top_k, average="micro", sync_on_compute=False)
    return metric.to(device)


@torch.no_grad()
def knn_majority(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor,
                 num_classes: int, k: int = 5, batch_size: int = 1024, *,
                 keep_samples: bool = True, seed: int = 0) -> dict:
    """Unweighted majority vote of the k nearest neighbours: ``{"top1"}`` in percent (and
    ``"samples"`` / ``"ci"`` with ``keep_samples``).
    Among classes tied on votes, the one whose first neighbour is nearest wins."""
    check_knn_inputs(train_x, train_y, test_x, test_y, k)
    device = train_x.device
    train_x, train_y = train_x.float(), train_y.long()
    top1 = accuracy_metric(num_classes, 1, device)
    hits = []
    for x, y in chunks(test_x.float().to(device), test_y.long().to(device), batch_size):
        _, index = nearest_neighbours(train_x, x, k)
        neighbours = train_y[index]  # (B, k), nearest first
        kk = neighbours.shape[1]
        counts = torch.zeros(x.shape[0], num_classes, device=device)
        counts.scatter_add_(1, neighbours, torch.ones_like(neighbours, dtype=counts.dtype))
        ranks = torch.arange(kk, device=device).expand_as(neighbours)
        first_rank = torch.full((x.shape[0], num_classes), kk, device=device, dtype=torch.long)
        first_rank.scatter_reduce_(1, neighbours, ranks, reduce="amin")
        # Votes dominate; the nearer first occurrence only breaks ties.
        score = counts * (kk + 1) + (kk - first_rank)
        top1.update(score.float(), y)
        if keep_samples:
            hits.append(topk_hits(score.float(), y, 1))
    result = {"top1": float(top1.compute()) * 100.0}
    if keep_samples:
        with_samples(result, hits_samples(top1=torch.cat(hits)), seed)
    return result


def knn_protocol(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor,
                 num_classes: int, k: int = 20, temperature: float = 0.07,
                 majority_k: int = 5, batch_size: int = 1024, *, keep_samples: bool = True,
                 seed: int = 0) -> dict:
    """Both kNN evaluations: ``{"k20_t0.07": {"top1", "top5"}, "k5_majority": {"top1"}}``
    (keys follow ``k``, ``temperature`` and ``majority_k``); with ``keep_samples`` each
    variant also holds its ``"samples"`` and ``"ci"``."""
    return {
        f"k{k}_t{temperature:g}": knn_classify(train_x, train_y, test_x, test_y, num_classes,
                                               k, temperature, batch_size,
                                               keep_samples=keep_samples, seed=seed),
        f"k{majority_k}_majority": knn_majority(train_x, train_y, test_x, test_y, num_classes,
                                                majority_k, batch_size,
                                                keep_samples=keep_samples, seed=seed),
    }
