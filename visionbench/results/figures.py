"""Figures a run writes besides the report's own plots."""

from __future__ import annotations

from pathlib import Path

import torch

from visionbench.results.records import atomic_write_bytes


def denormalize(imgs: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    c = imgs.shape[1]
    m = torch.tensor(_per_channel(mean, c), dtype=imgs.dtype).view(1, c, 1, 1)
    s = torch.tensor(_per_channel(std, c), dtype=imgs.dtype).view(1, c, 1, 1)
    return (imgs * s + m).clamp(0, 1)


def _per_channel(values: list[float], c: int) -> list[float]:
    if len(values) == c:
        return list(values)
    if c == 1:
        return [sum(values) / len(values)]
    return [values[0]] * c if len(values) == 1 else list(values[:c])


def save_reconstruction_figure(
    path: Path,
    original: torch.Tensor,
    masked: torch.Tensor,
    reconstruction: torch.Tensor,
    mean: list[float],
    std: list[float],
) -> Path:
    """One row per image: input, masked input, reconstruction (visible patches pasted)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = (("input", original), ("masked", masked), ("reconstruction", reconstruction))
    n = original.shape[0]
    fig, axes = plt.subplots(n, 3, figsize=(6, 2 * n), squeeze=False)
    for col, (title, batch) in enumerate(columns):
        images = denormalize(batch.detach().float().cpu(), mean, std)
        for row in range(n):
            ax = axes[row][col]
            img = images[row].permute(1, 2, 0).numpy()
            ax.imshow(img[..., 0] if img.shape[-1] == 1 else img[..., :3], cmap="gray")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path
