"""The linear protocol of SSL4EO-S12 and SoftCon: a Linear head on a frozen backbone,
trained on augmented images (zhu-xlab/SSL4EO-S12,
``src/benchmark/transfer_classification/linear_BE_moco.py`` for BigEarthNet and
``linear_EU_moco.py`` for EuroSAT).

As the official scripts:

- the head is ``Linear(D, C)`` with weight ~ N(0, 0.01) and bias 0; the backbone is frozen
  (``requires_grad=False``) and in eval mode;
- SGD, momentum 0.9, no weight decay, lr 0.05, batch 256, 100 epochs, the lr times 0.1 at
  epochs 60 and 80 (``adjust_learning_rate`` without ``--cos``), ``drop_last`` training
  batches;
- train transform RandomResizedCrop(224) with scale (0.8, 1) for BigEarthNet ("multilabel,
  avoid cropping out labels") and torchvision's default (0.08, 1) for EuroSAT, horizontal
  flip; test transform Resize(256) + CenterCrop(224);
- BigEarthNet: ``MultiLabelSoftMarginLoss``, micro-averaged average precision
  (``multilabel_average_precision``, here with macro beside it); EuroSAT: cross-entropy and
  top-1 accuracy; the 10 % label fraction is ``random_subset(train, 0.1, seed 42)``
  (``datasets/BigEarthNet/bigearthnet_dataset_seco_lmdb_s2_uint8.py``: NumPy's
  ``default_rng(42).choice(N, int(0.1 N))``, drawn with replacement, so a patch can repeat;
  ``random_subset_indices``). The official draws from its LMDB's order, ours from the
  split file's, so the patches match only where those orders do.

Deviations: sizes scale with ``size`` (crop ``size``, test resize ``round(size x 256 /
224)``), so a demo at 96 px keeps the official ratio; scores are over the whole test split
(the official averages per-batch micro AP over ``drop_last`` validation batches, which
leaves out the last partial batch and is not the split's AP); a training split smaller
than the batch trains on one batch of all of it (the official would run no step).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode, v2

from visionbench.errors import ConfigError
from visionbench.evals.rs_protocol import accuracy_with_samples, multilabel_average_precision


@dataclass(frozen=True)
class LinearSpec:
    epochs: int = 100
    lr: float = 0.05
    momentum: float = 0.9
    batch_size: int = 256
    milestones: tuple[int, ...] = (60, 80)
    size: int = 224
    crop_scale: tuple[float, float] = (0.8, 1.0)  # BigEarthNet; EuroSAT: (0.08, 1.0)
    seed: int = 42

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.size < 1 or self.lr <= 0:
            raise ConfigError(f"linear protocol: epochs, batch size, size and lr must be "
                              f"positive, got {self}")


def random_subset_indices(n: int, fraction: float, seed: int = 42) -> list[int]:
    """The official ``random_subset``: ``int(fraction x n)`` indices drawn with replacement
    by ``numpy.random.default_rng(seed).choice``; all of them at a fraction of 1 (the
    official draws no subset then)."""
    import numpy as np

    if fraction >= 1:
        return list(range(n))
    count = int(fraction * n)
    if count < 1:
        raise ConfigError(f"a label fraction of {fraction:g} of {n} samples keeps none")
    return np.random.default_rng(seed).choice(range(n), count).tolist()


def step_lr(lr: float, epoch: int, milestones: Sequence[int]) -> float:
    """``adjust_learning_rate``: ``lr`` times 0.1 for every milestone reached."""
    return lr * 0.1 ** sum(epoch >= m for m in milestones)


class _Images(Dataset):
    def __init__(self, dataset: Dataset, transform) -> None:
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        sample = self.dataset[i]
        return self.transform(sample["image"].float()), sample["label"]


def transforms(spec: LinearSpec):
    """(train, test) transforms of raw band tensors, as the official scripts'."""
    train = v2.Compose([
        v2.RandomResizedCrop(spec.size, scale=spec.crop_scale, antialias=True,
                             interpolation=InterpolationMode.BILINEAR),
        v2.RandomHorizontalFlip()])
    test = v2.Compose([
        v2.Resize(round(spec.size * 256 / 224), antialias=True,
                  interpolation=InterpolationMode.BILINEAR),
        v2.CenterCrop(spec.size)])
    return train, test


@torch.no_grad()
def _features(features: Callable[[Tensor], Tensor], images: Tensor) -> Tensor:
    return features(images).float()


def train_linear(features: Callable[[Tensor], Tensor], dim: int, train: Dataset,
                 test: Dataset, num_classes: int, multi_label: bool,
                 spec: LinearSpec = LinearSpec(), device: str = "cpu",
                 log: Callable[[str], None] = print, num_workers: int = 0) -> dict:
    """Train the head on ``features`` (the frozen encoder, raw band tensors in, its input
    normalization inside) and score it on ``test``: ``{"map_micro", "map_macro"}`` or
    ``{"top1"}`` (percent, with samples and interval)."""
    if len(train) == 0 or len(test) == 0:
        raise ConfigError("linear protocol: an empty train or test split")
    train_tf, test_tf = transforms(spec)
    g = torch.Generator().manual_seed(spec.seed)
    batch = min(spec.batch_size, len(train))
    loader = DataLoader(_Images(train, train_tf), batch_size=batch, shuffle=True,
                        drop_last=True, generator=g, num_workers=num_workers)
    torch.manual_seed(spec.seed)
    head = nn.Linear(dim, num_classes).to(device)
    nn.init.normal_(head.weight, 0.0, 0.01)
    nn.init.zeros_(head.bias)
    opt = torch.optim.SGD(head.parameters(), lr=spec.lr, momentum=spec.momentum)
    for epoch in range(spec.epochs):
        for group in opt.param_groups:
            group["lr"] = step_lr(spec.lr, epoch, spec.milestones)
        total, seen = 0.0, 0
        for images, labels in loader:
            x = _features(features, images.to(device))
            logits = head(x)
            labels = labels.to(device)
            if multi_label:
                loss = F.multilabel_soft_margin_loss(logits, labels.float())
            else:
                loss = F.cross_entropy(logits, labels.long())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, seen = total + loss.detach().item() * len(labels), seen + len(labels)
        if epoch == 0 or (epoch + 1) % 10 == 0 or epoch + 1 == spec.epochs:
            log(f"  linear epoch {epoch + 1}/{spec.epochs}: loss {total / max(seen, 1):.4f}")
    scores, targets = [], []
    head.eval()
    with torch.no_grad():
        for images, labels in DataLoader(_Images(test, test_tf), batch_size=spec.batch_size,
                                         num_workers=num_workers):
            scores.append(head(_features(features, images.to(device))).cpu())
            targets.append(labels)
    scores, targets = torch.cat(scores), torch.cat(targets)
    if multi_label:
        return multilabel_average_precision(torch.sigmoid(scores.double()), targets,
                                            spec.seed)
    return accuracy_with_samples(scores.argmax(dim=1) == targets.long(), spec.seed)
