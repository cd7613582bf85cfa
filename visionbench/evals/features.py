"""Frozen-backbone feature extraction, cached once on disk for every probe.

Follows the feature pipeline of facebookresearch/dino ``eval_knn.py`` (``extract_features``:
eval mode, no gradients, one pass over the loader) and its ``eval_linear.py``
``n_last_blocks`` protocol (the cls tokens of the last k blocks, each through the final
norm, concatenated). The "cls" pooling is MAE's ``models_vit.py`` with
``global_pool=False``: the final-normed cls token.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from visionbench.data.batch import unpack
from visionbench.errors import ConfigError, DataError

POOLINGS = ("cls", "mean", "lastk")


def check_pooling(pooling: str) -> None:
    if pooling not in POOLINGS:
        raise ConfigError(f"pooling: unknown value {pooling!r}; expected one of {list(POOLINGS)}")


def is_vit(backbone: nn.Module) -> bool:
    """A timm ViT-like backbone (token sequence with blocks); anything else is pooled by
    its own ``forward`` (e.g. a timm ResNet with ``num_classes=0``)."""
    return hasattr(backbone, "blocks")


def pooled_features(backbone: nn.Module, images: Tensor, pooling: str = "cls",
                    last_k: int = 4) -> Tensor:
    """One batch of frozen features (B, D), or (B, last_k * D) for ``lastk``."""
    check_pooling(pooling)
    if not is_vit(backbone):
        return backbone(images)
    if pooling == "lastk":
        outputs = backbone.forward_intermediates(
            images, indices=last_k, norm=True, return_prefix_tokens=True,
            intermediates_only=True,
        )
        return torch.cat([prefix[:, 0] for _spatial, prefix in outputs], dim=-1)
    tokens = backbone.forward_features(images)
    if pooling == "cls":
        return tokens[:, 0]
    return tokens[:, backbone.num_prefix_tokens:].mean(dim=1)


def split_batch(batch) -> tuple[Tensor, Tensor]:
    """(images, labels) of a dict batch (``video`` clips where it holds no ``image``), or
    of an ``(x, y)`` tuple."""
    if isinstance(batch, dict) and "image" not in batch and "video" in batch:
        return unpack(batch, "video", "label")
    return unpack(batch, "image", "label")


def extract_features(backbone: nn.Module, loader: Iterable, pooling: str = "cls",
                     last_k: int = 4, device: str | torch.device = "cpu",
                     progress: bool = True) -> tuple[Tensor, Tensor]:
    """Features float32 (N, D) and labels int64 (N,) of every batch of ``loader``, on CPU.

    ``backbone`` is moved to ``device`` and left in eval mode."""
    check_pooling(pooling)
    backbone = backbone.to(device).eval()
    features, labels = [], []
    with torch.inference_mode():
        for batch in tqdm(loader, desc=f"features ({pooling})", disable=not progress,
                          leave=False):
            images, targets = split_batch(batch)
            feats = pooled_features(backbone, images.to(device), pooling, last_k)
            features.append(feats.float().cpu())
            labels.append(torch.as_tensor(targets).long().cpu())
    if not features:
        raise DataError("feature extraction: the data loader yielded no batches")
    return torch.cat(features), torch.cat(labels)


def save_atomic(obj: dict, path: Path) -> None:
    """``torch.save`` into a temporary file next to ``path``, then rename over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def cached_features(cache_path: Path, backbone: nn.Module, loader: Iterable,
                    pooling: str = "cls", last_k: int = 4,
                    device: str | torch.device = "cpu",
                    progress: bool = True) -> tuple[Tensor, Tensor]:
    """Features and labels from ``cache_path`` (a ``.pt`` file) if it exists, else extracted
    once and saved there atomically. The cache key is the caller's: one file per
    (checkpoint, split, pooling, last_k)."""
    cache_path = Path(cache_path)
    check_pooling(pooling)
    if cache_path.exists():
        try:
            cached = torch.load(cache_path, map_location="cpu", weights_only=True)
            features, labels = cached["features"], cached["labels"]
        except (OSError, RuntimeError, KeyError, TypeError, EOFError) as err:
            raise DataError(f"{cache_path}: not a readable feature cache ({err}); "
                            "delete it to extract the features again") from err
        wanted = (pooling, last_k if pooling == "lastk" else None)
        stored = (cached.get("pooling"), cached.get("last_k") if pooling == "lastk" else None)
        if stored != wanted:
            raise DataError(f"{cache_path}: features cached with pooling={stored[0]!r}, "
                            f"last_k={cached.get('last_k')}; requested pooling={pooling!r}, "
                            f"last_k={last_k}")
        return features, labels
    features, labels = extract_features(backbone, loader, pooling, last_k, device, progress)
    save_atomic({"features": features, "labels": labels, "pooling": pooling,
                 "last_k": last_k}, cache_path)
    return features, labels
