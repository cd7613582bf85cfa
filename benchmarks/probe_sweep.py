"""Cached-feature probe sweep versus the naive per-config probe, wall time.

(a) cached: extract frozen features of train/val/test once, then ``linear_probe_sweep``
    trains all grid heads together on the cached features for E epochs.
(b) naive: each grid point is its own probe (same head, LARS and schedule) trained for E
    epochs with a forward pass through the frozen backbone at every step, then evaluated
    on val; the best config is evaluated on test.

The naive path does the same work every epoch of every config, so by default it is timed
over ``--naive-epochs`` (1) epochs of all 8 configs and scaled to E epochs; pass
``--naive-epochs`` equal to ``--epochs`` to time it in full (minutes on 2 CPU cores).

    python benchmarks/probe_sweep.py [--epochs 10] [--patch-size 8] [--device cpu]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch.utils.data import DataLoader, TensorDataset

from visionbench.evals.features import extract_features, pooled_features
from visionbench.evals.linear_probe import LARS, LinearHeads, linear_probe_sweep, minibatches
from visionbench.methods.schedule import half_cycle_cosine

NUM_CLASSES = 10
LRS = [0.3, 1.0, 3.0, 10.0]
WEIGHT_DECAYS = [0.0, 1e-4]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--patch-size", type=int, default=8)
    parser.add_argument("--embed-dim", type=int, default=192)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--naive-epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def synthetic_images(n: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise plus a per-class random template, so that probes have something to learn."""
    g = torch.Generator().manual_seed(seed)
    templates = torch.randn(NUM_CLASSES, 3, size, size, generator=g)
    labels = torch.arange(n) % NUM_CLASSES
    labels = labels[torch.randperm(n, generator=g)]
    return torch.randn(n, 3, size, size, generator=g) + 0.5 * templates[labels], labels


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def cached_sweep(backbone, splits, args) -> tuple[float, dict]:
    start = time.perf_counter()
    feats = []
    for images, labels in splits:
        loader = DataLoader(TensorDataset(images, labels), batch_size=256)
        x, y = extract_features(backbone, loader, "cls", device=args.device, progress=False)
        feats += [x.to(args.device), y.to(args.device)]
    result = linear_probe_sweep(*feats, NUM_CLASSES, LRS, WEIGHT_DECAYS, args.epochs,
                                args.batch_size, warmup_epochs=1, seed=args.seed, classes=None)
    sync(args.device)
    return time.perf_counter() - start, result


@torch.no_grad()
def frozen_cls(backbone, images: torch.Tensor) -> torch.Tensor:
    return pooled_features(backbone, images, "cls").float()


def naive_probe(backbone, train, lr: float, wd: float, epochs: int, args):
    """One probe trained with a backbone forward at every step; returns the head."""
    images, labels = train
    generator = torch.Generator().manual_seed(args.seed)
    head = LinearHeads(args.embed_dim, NUM_CLASSES, 1, generator).to(args.device)
    opt = LARS([{"params": list(head.parameters()), "lr": lr, "weight_decay": wd}])
    steps = max(images.shape[0] // args.batch_size, 1)
    for epoch in range(epochs):
        head.train()
        for step, (x, y) in enumerate(minibatches(images, labels, args.batch_size, generator)):
            for group in opt.param_groups:
                group["lr"] = lr * half_cycle_cosine(epoch + step / steps, 1.0, 0.0, 1, args.epochs)
            loss = F.cross_entropy(head(frozen_cls(backbone, x))[0], y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return head


def top1(backbone, head, images, labels) -> float:
    head.eval()
    with torch.no_grad():
        logits = torch.cat([head(frozen_cls(backbone, images[i:i + 256]))[0]
                            for i in range(0, images.shape[0], 256)])
    return float((logits.argmax(1) == labels).float().mean()) * 100.0


def naive_sweep(backbone, splits, args) -> tuple[float, float, float]:
    """(train seconds over naive_epochs, eval seconds, best val top-1)."""
    train, val, test = ((x.to(args.device), y.to(args.device)) for x, y in splits)
    train_s = eval_s = 0.0
    best_val, best_head = -1.0, None
    for lr in LRS:
        for wd in WEIGHT_DECAYS:
            start = time.perf_counter()
            head = naive_probe(backbone, train, lr, wd, args.naive_epochs, args)
            sync(args.device)
            train_s += time.perf_counter() - start
            start = time.perf_counter()
            val_top1 = top1(backbone, head, *val)
            eval_s += time.perf_counter() - start
            if val_top1 > best_val:
                best_val, best_head = val_top1, head
    start = time.perf_counter()
    top1(backbone, best_head, *test)
    eval_s += time.perf_counter() - start
    return train_s, eval_s, best_val


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    backbone = VisionTransformer(img_size=args.img_size, patch_size=args.patch_size,
                                 embed_dim=args.embed_dim, depth=args.depth, num_heads=3,
                                 num_classes=0).to(args.device).eval()
    images, labels = synthetic_images(args.images, args.img_size, args.seed)
    n_train, n_val = int(0.8 * args.images), int(0.1 * args.images)
    splits = [(images[:n_train], labels[:n_train]),
              (images[n_train:n_train + n_val], labels[n_train:n_train + n_val]),
              (images[n_train + n_val:], labels[n_train + n_val:])]
    grid = len(LRS) * len(WEIGHT_DECAYS)
    print(f"ViT embed {args.embed_dim} depth {args.depth} img {args.img_size} patch "
          f"{args.patch_size}; {args.images} images ({n_train} train); {grid} configs x "
          f"{args.epochs} epochs; batch {args.batch_size}; device {args.device}; "
          f"{torch.get_num_threads()} threads")

    cached_s, result = cached_sweep(backbone, splits, args)
    best_cached = max(e["val_top1"] for e in result["grid"])
    print(f"(a) cached features + joint sweep: {cached_s:8.1f} s  "
          f"(best val top-1 {best_cached:.1f} %, test top-1 {result['test_top1']:.1f} %)")

    train_s, eval_s, best_naive = naive_sweep(backbone, splits, args)
    naive_s = train_s * args.epochs / args.naive_epochs + eval_s
    how = ("measured" if args.naive_epochs == args.epochs else
           f"{train_s + eval_s:.1f} s measured over {args.naive_epochs} of {args.epochs} "
           "epochs, scaled")
    print(f"(b) naive per-config probes:       {naive_s:8.1f} s  ({how}; "
          f"best val top-1 {best_naive:.1f} % after {args.naive_epochs} epoch(s))")
    print(f"speed-up (b) / (a): {naive_s / cached_s:.1f}x")


if __name__ == "__main__":
    main()
