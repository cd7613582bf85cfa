"""Linear probing on cached frozen features: a grid of heads trained together in one pass.

Follows facebookresearch/mae ``main_linprobe.py``: the head is
``BatchNorm1d(D, affine=False, eps=1e-6)`` then ``Linear(D, C)`` with weight
trunc_normal(std=0.01) and bias 0, trained with cross-entropy by LARS (``util/lars.py``:
momentum 0.9, trust coefficient 0.001, no weight decay and no trust scaling for 1-D
parameters) under a per-iteration linear warmup then half-cycle cosine to 0
(``util/lr_sched.py``). MAE uses weight decay 0; here it is a grid axis.

Every (lr, weight decay) pair is its own head, and all heads see the same shuffled
mini-batches in one pass over the features per epoch: the weights are stacked into one
(H, D, C) einsum, and the optimizer has one parameter group per head with that head's lr
and weight decay. The BatchNorm has no affine parameters and every head normalizes the same
batch, so one BatchNorm serves all heads exactly as H separate ones would.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from visionbench.errors import ConfigError
from visionbench.methods.schedule import half_cycle_cosine
from visionbench.results.bootstrap import hits_samples, with_samples

EVAL_BATCH = 4096


class LARS(torch.optim.Optimizer):
    """LARS as in MAE's linear probe (from MoCo v3): for parameters with more than one
    dimension the update ``grad + wd * p`` is rescaled by
    ``trust_coefficient * |p| / |update|``; 1-D parameters take the plain gradient. Then
    heavy-ball momentum and a step of ``-lr``."""

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0,
                 momentum: float = 0.9, trust_coefficient: float = 0.001) -> None:
        defaults = {"lr": lr, "weight_decay": weight_decay, "momentum": momentum,
                    "trust_coefficient": trust_coefficient}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                update = param.grad
                if param.ndim > 1:
                    update = update.add(param, alpha=group["weight_decay"])
                    param_norm = param.norm()
                    update_norm = update.norm()
                    trust = group["trust_coefficient"] * param_norm / update_norm
                    usable = (param_norm > 0) & (update_norm > 0)
                    update = update * torch.where(usable, trust, torch.ones_like(trust))
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(param)
                buffer = state["momentum_buffer"]
                buffer.mul_(group["momentum"]).add_(update)
                param.add_(buffer, alpha=-group["lr"])


class LinearHeads(nn.Module):
    """H linear heads over one BatchNorm'd feature batch; ``forward`` gives (H, N, C)."""

    def __init__(self, dim: int, num_classes: int, num_heads: int,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for _ in range(num_heads):
            weight = torch.empty(dim, num_classes)
            nn.init.trunc_normal_(weight, std=0.01, generator=generator)
            self.weights.append(nn.Parameter(weight))
            self.biases.append(nn.Parameter(torch.zeros(num_classes)))

    def forward(self, features: Tensor) -> Tensor:
        normed = self.norm(features)
        weight = torch.stack(list(self.weights))
        bias = torch.stack(list(self.biases))
        return torch.einsum("nd,hdc->hnc", normed, weight) + bias[:, None, :]


def minibatches(features: Tensor, labels: Tensor, batch_size: int,
                generator: torch.Generator) -> Iterator[tuple[Tensor, Tensor]]:
    """One epoch of shuffled mini-batches; the last incomplete one is dropped, as MAE's
    training loader does, unless the whole set is smaller than one batch."""
    n = features.shape[0]
    order = torch.randperm(n, generator=generator).to(features.device)
    steps = max(n // batch_size, 1)
    for step in range(steps):
        index = order[step * batch_size:(step + 1) * batch_size]
        yield features[index], labels[index]


@torch.no_grad()
def head_logits(heads: LinearHeads, features: Tensor) -> Tensor:
    heads.eval()
    chunks = [heads(features[i:i + EVAL_BATCH]) for i in range(0, features.shape[0], EVAL_BATCH)]
    return torch.cat(chunks, dim=1)


def accuracy(logits: Tensor, labels: Tensor, num_classes: int, top_k: int = 1) -> float:
    """Sample-averaged top-k accuracy in percent, by torchmetrics."""
    metric = MulticlassAccuracy(num_classes, top_k=top_k, average="micro",
                                sync_on_compute=False).to(logits.device)
    return float(metric(logits, labels)) * 100.0


def topk_hits(logits: Tensor, labels: Tensor, top_k: int = 1) -> Tensor:
    """Per-sample booleans (N,) on the CPU: the label is among the ``top_k`` highest logits.
    Top-1 is the argmax and top-k ``torch.topk``, as torchmetrics' ``MulticlassAccuracy``
    decides, so the mean of the hits is the reported accuracy."""
    if top_k == 1:
        return (logits.argmax(dim=1) == labels).cpu()
    return (logits.topk(top_k, dim=1).indices == labels[:, None]).any(dim=1).cpu()


def per_class_accuracy(logits: Tensor, labels: Tensor, num_classes: int) -> list[float]:
    metric = MulticlassAccuracy(num_classes, average=None, sync_on_compute=False).to(logits.device)
    return [float(v) * 100.0 for v in metric(logits, labels)]


def check_inputs(train_x: Tensor, train_y: Tensor, num_classes: int, lrs: list[float],
                 weight_decays: list[float], epochs: int, batch_size: int,
                 classes: list[str] | None) -> None:
    if not lrs or not weight_decays:
        raise ConfigError("linear probe: lrs and weight_decays must each hold at least one value")
    if epochs < 1 or batch_size < 1:
        raise ConfigError(f"linear probe: epochs ({epochs}) and batch_size ({batch_size}) "
                          "must be >= 1")
    if train_x.ndim != 2 or train_x.shape[0] != train_y.shape[0] or train_x.shape[0] < 2:
        raise ConfigError(f"linear probe: expected features (N>=2, D) with N labels, got "
                          f"{tuple(train_x.shape)} and {tuple(train_y.shape)}")
    if num_classes < 2:
        raise ConfigError(f"linear probe: num_classes must be >= 2, got {num_classes}")
    if classes is not None and len(classes) != num_classes:
        raise ConfigError(f"linear probe: {len(classes)} class names for {num_classes} classes")


def grid_extension(lrs: list[float], weight_decays: list[float], best: tuple[float, float]
                   ) -> tuple[list[float], list[float], list[str]]:
    """The points one extension adds past the edges of the grid on which ``best`` lies.

    An axis is extended geometrically by the ratio of its last (first) two values, one new
    value past the edge (x 10 when the axis holds one value). The lr axis is extended at both
    ends; the weight-decay axis upwards, and downwards only from a positive value (0 is a
    natural edge, nothing lies below it). Returns ``(new lrs, new weight decays, edges)``.
    """
    lrs, wds = sorted(set(lrs)), sorted(set(weight_decays))
    new_lrs, new_wds, edges = [], [], []

    def ratio(values: list[float], top: bool) -> float:
        if len(values) < 2 or values[0] <= 0:
            return 10.0
        return values[-1] / values[-2] if top else values[1] / values[0]

    lr, wd = best
    if lr == lrs[-1]:
        new_lrs.append(lr * ratio(lrs, True))
        edges.append("largest lr")
    elif lr == lrs[0] and len(lrs) > 1:
        new_lrs.append(lr / ratio(lrs, False))
        edges.append("smallest lr")
    if wd == wds[-1] and wd > 0:
        positive = [w for w in wds if w > 0]
        new_wds.append(wd * ratio(positive, True))
        edges.append("largest weight decay")
    elif wd == wds[0] and wd > 0 and len(wds) > 1:
        new_wds.append(wd / ratio(wds, False))
        edges.append("smallest weight decay")
    return new_lrs, new_wds, edges


def train_heads(train_x: Tensor, train_y: Tensor, grid: list[tuple[float, float]],
                num_classes: int, epochs: int, batch_size: int, warmup_epochs: float, seed: int,
                optimizer: str = "lars") -> LinearHeads:
    """One head per ``(lr, weight decay)`` of ``grid``, all trained in one pass per epoch.

    Every head starts from the same initial weights and sees the same mini-batches (both fixed
    by ``seed``), so a head's result depends on its own (lr, weight decay) only: heads trained
    in a later call (a grid extension) are exactly those a larger first grid would have held.
    """
    device = train_x.device
    init = torch.empty(train_x.shape[1], num_classes)
    nn.init.trunc_normal_(init, std=0.01, generator=torch.Generator().manual_seed(seed))
    heads = LinearHeads(train_x.shape[1], num_classes, len(grid)).to(device)
    with torch.no_grad():
        for weight in heads.weights:
            weight.copy_(init)
    groups = [{"params": [heads.weights[h], heads.biases[h]], "lr": lr, "peak_lr": lr,
               "weight_decay": wd} for h, (lr, wd) in enumerate(grid)]
    if optimizer == "lars":
        opt: torch.optim.Optimizer = LARS(groups)
    else:
        opt = torch.optim.SGD(groups, lr=grid[0][0], momentum=0.9)

    generator = torch.Generator().manual_seed(seed)
    train_x, train_y = train_x.float(), train_y.long().to(device)
    steps_per_epoch = max(train_x.shape[0] // batch_size, 1)
    for epoch in range(epochs):
        heads.train()
        for step, (x, y) in enumerate(minibatches(train_x, train_y, batch_size, generator)):
            progress = epoch + step / steps_per_epoch
            factor = half_cycle_cosine(progress, 1.0, 0.0, warmup_epochs, epochs)
            for group in opt.param_groups:
                group["lr"] = group["peak_lr"] * factor
            logits = heads(x)
            # Sum of each head's mean loss: the heads share no parameter.
            loss = F.cross_entropy(logits.flatten(0, 1), y.repeat(len(grid))) * len(grid)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return heads


def best_index(results: list[dict]) -> int:
    """The highest val top-1; ties go to the lower lr, then the lower weight decay."""
    return min(range(len(results)), key=lambda h: (-results[h]["val_top1"],
                                                   results[h]["lr"], results[h]["weight_decay"]))


def linear_probe_sweep(train_x: Tensor, train_y: Tensor, val_x: Tensor, val_y: Tensor,
                       test_x: Tensor, test_y: Tensor, num_classes: int, lrs: list[float],
                       weight_decays: list[float], epochs: int, batch_size: int,
                       warmup_epochs: int, seed: int, classes: list[str] | None = None,
                       optimizer: str = "lars", max_extensions: int = 0,
                       keep_samples: bool = True) -> dict:
    """Train one head per (lr, weight decay) in one pass per epoch, pick the best by val
    top-1 (ties: the lower lr, then the lower weight decay), test it.

    When the best lies on an edge of the grid (``grid_extension``), up to ``max_extensions``
    times the grid is extended past that edge and the new heads are trained on the same cached
    features (one more pass per extension); ``extensions`` records each one and
    ``best_position`` says where the final best lies ("interior", or the edges it is on).

    Learning rates are absolute. ``optimizer`` is ``"lars"`` (MAE) or ``"sgd"`` (SGD with
    momentum 0.9, weight decay on every parameter). Runs on the device of ``train_x``.
    Returns ``{"grid": [{"lr", "weight_decay", "val_top1", "val_top5"}, ...],
    "best": {"lr", "weight_decay"}, "best_position", "extensions", "test_top1", "test_top5",
    "classes", "per_class_acc"}`` with accuracies in percent. With ``keep_samples`` (the
    default) also the chosen head's per-sample test hits, ``"samples": {"kind": "hits", "n",
    "top1": "0110...", "top5": ...}`` (``visionbench.results.bootstrap``), and their 95%
    bootstrap intervals ``"ci": {"top1": [low, high], "top5": [low, high]}`` (1,000
    resamples seeded by ``seed``).
    """
    check_inputs(train_x, train_y, num_classes, lrs, weight_decays, epochs, batch_size,
                 classes)
    if optimizer not in ("lars", "sgd"):
        raise ConfigError(f"linear probe: unknown optimizer {optimizer!r}; "
                          "expected one of ['lars', 'sgd']")
    if max_extensions < 0:
        raise ConfigError(f"linear probe: max_extensions must be >= 0, got {max_extensions}")
    device = train_x.device
    top5 = min(5, num_classes)
    val_x, val_y = val_x.float().to(device), val_y.long().to(device)
    axes = (list(lrs), list(weight_decays))
    results: list[dict] = []
    trained: list[tuple[LinearHeads, int]] = []  # (heads, index of the head's grid point)
    extensions: list[dict] = []
    points = [(lr, wd) for lr in axes[0] for wd in axes[1]]
    while True:
        heads = train_heads(train_x, train_y, points, num_classes, epochs, batch_size,
                            warmup_epochs, seed, optimizer)
        val_logits = head_logits(heads, val_x)
        for h, (lr, wd) in enumerate(points):
            results.append({"lr": lr, "weight_decay": wd,
                            "val_top1": accuracy(val_logits[h], val_y, num_classes),
                            "val_top5": accuracy(val_logits[h], val_y, num_classes, top5)})
            trained.append((heads, h))
        best = best_index(results)
        new_lrs, new_wds, edges = grid_extension(*axes, (results[best]["lr"],
                                                         results[best]["weight_decay"]))
        if not edges or len(extensions) == max_extensions:
            break
        axes = (axes[0] + new_lrs, axes[1] + new_wds)
        done = {(r["lr"], r["weight_decay"]) for r in results}
        points = [(lr, wd) for lr in axes[0] for wd in axes[1] if (lr, wd) not in done]
        extensions.append({"edges": edges, "added_lrs": new_lrs, "added_weight_decays": new_wds,
                           "best_before": {"lr": results[best]["lr"],
                                           "weight_decay": results[best]["weight_decay"]}})

    heads, h = trained[best]
    test_logits = head_logits(heads, test_x.float().to(device))[h]
    test_y = test_y.long().to(device)
    result = {
        "grid": results,
        "best": {"lr": results[best]["lr"], "weight_decay": results[best]["weight_decay"]},
        "best_position": "interior" if not edges else "edge: " + ", ".join(edges),
        "extensions": extensions,
        "test_top1": accuracy(test_logits, test_y, num_classes),
        "test_top5": accuracy(test_logits, test_y, num_classes, top5),
        "classes": list(classes) if classes is not None else [str(c) for c in range(num_classes)],
        "per_class_acc": per_class_accuracy(test_logits, test_y, num_classes),
    }
    if keep_samples:
        samples = hits_samples(top1=topk_hits(test_logits, test_y),
                               top5=topk_hits(test_logits, test_y, top5))
        with_samples(result, samples, seed)
    return result
