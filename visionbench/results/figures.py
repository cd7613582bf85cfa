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


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path, dpi: int = 90) -> Path:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    _pyplot().close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def save_block_profile_figure(
    path: Path,
    panels: dict[str, dict[str, list[float]]],
    ylabel: str,
    title: str,
    log_scale: bool = True,
) -> Path:
    """One panel per key of ``panels`` (e.g. a training step); in each, one line per entry
    (e.g. a norm/placement) over the block index."""
    plt = _pyplot()
    n = max(1, len(panels))
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.6), squeeze=False)
    for ax, (panel, curves) in zip(axes[0], panels.items(), strict=False):
        colours = plt.get_cmap("tab20").colors
        for i, (label, values) in enumerate(curves.items()):
            ax.plot(range(1, len(values) + 1), values, marker="os^"[i // 10 % 3], ms=3,
                    color=colours[(2 * i) % 20 if i < 10 else (2 * i + 1) % 20],
                    linestyle="-" if i < 10 else "--", label=label)
        ax.set_title(panel)
        ax.set_xlabel("block")
        ax.set_ylabel(ylabel)
        if log_scale:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="center right", fontsize=7)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 0.82, 1))
    return _save(fig, path)


def save_mask_figure(
    path: Path,
    images: torch.Tensor,
    truth: torch.Tensor,
    predictions: dict[str, torch.Tensor],
    num_classes: int,
    mean: list[float],
    std: list[float],
    ignore_index: int = 255,
) -> Path:
    """One row per image: the input, the ground-truth mask, then each model's predicted mask,
    in one fixed colour per class (ignored pixels black)."""
    import numpy as np

    plt = _pyplot()
    cmap = plt.get_cmap("tab20", max(num_classes, 2))
    palette = (np.array([cmap(i)[:3] for i in range(num_classes)]) * 255).astype(np.uint8)

    def colour(mask: torch.Tensor):
        m = mask.cpu().numpy()
        out = np.zeros((*m.shape, 3), np.uint8)
        valid = (m != ignore_index) & (m < num_classes)
        out[valid] = palette[m[valid]]
        return out

    columns = ["input", "ground truth", *predictions]
    n = images.shape[0]
    fig, axes = plt.subplots(n, len(columns), figsize=(1.8 * len(columns), 1.8 * n),
                             squeeze=False)
    shown = denormalize(images.detach().float().cpu(), mean, std)
    for row in range(n):
        cells = [shown[row].permute(1, 2, 0).numpy()[..., :3], colour(truth[row])]
        cells += [colour(pred[row]) for pred in predictions.values()]
        for col, cell in enumerate(cells):
            ax = axes[row][col]
            ax.imshow(cell)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(columns[col], fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def save_alpha_curves(path: Path, alphas: list[float], curves: dict[str, list[float]]) -> Path:
    """Accuracy against alpha, one line per curve (corruptions thin, the mean and the clean
    set bold); alpha 1 is the source model."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    colours = plt.get_cmap("tab10").colors
    for i, (label, values) in enumerate(curves.items()):
        bold = label.startswith(("mean", "clean"))
        ax.plot(alphas, values, marker="o", ms=3, lw=2.4 if bold else 1.2,
                ls="--" if label == "clean" else "-",
                color="black" if bold and label != "clean" else colours[i % 10], label=label)
    ax.set_xlabel("alpha (weight of the source statistics; 1 = source model)")
    ax.set_ylabel("top-1 (%), mean over severities")
    ax.set_title("alpha-BN: accuracy against alpha per corruption")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    return _save(fig, path)


def save_clip_reconstruction_figure(path: Path, clips: torch.Tensor, masks: torch.Tensor,
                                    reconstructions: torch.Tensor, grid: tuple[int, int, int],
                                    tubelet: int, max_frames: int = 8) -> Path:
    """Per clip three rows, its frames side by side: the clip, the clip with the encoder's
    (tube) mask greyed out, and the reconstruction with the visible tokens pasted in.
    ``clips`` / ``reconstructions``: (B, C, T, H, W) in [0, 1]; ``masks``: (B, t * h * w)
    True = masked, over the token ``grid`` (t, h, w) of tubelets of ``tubelet`` frames."""
    plt = _pyplot()
    b, _, frames, height, width = clips.shape
    t, h, w = grid
    shown = torch.linspace(0, frames - 1, min(frames, max_frames)).long().tolist()
    tokens = masks.reshape(b, t, h, w).float()
    pixel_mask = tokens.repeat_interleave(tubelet, 1).repeat_interleave(
        height // h, 2).repeat_interleave(width // w, 3)  # (B, T, H, W)
    fig, axes = plt.subplots(3 * b, len(shown), figsize=(1.3 * len(shown), 4.0 * b),
                             squeeze=False)
    for i in range(b):
        masked = clips[i] * (1 - pixel_mask[i])[None] + 0.5 * pixel_mask[i][None]
        for row, (label, clip) in enumerate((("clip", clips[i]), ("tube mask", masked),
                                             ("reconstruction", reconstructions[i]))):
            for col, f in enumerate(shown):
                ax = axes[3 * i + row][col]
                frame = clip[:, f].detach().float().cpu().clamp(0, 1).permute(1, 2, 0).numpy()
                ax.imshow(frame[..., 0] if frame.shape[-1] == 1 else frame[..., :3],
                          cmap="gray")
                ax.set_xticks([])
                ax.set_yticks([])
                if col == 0:
                    ax.set_ylabel(label, fontsize=7)
                if i == 0 and row == 0:
                    ax.set_title(f"frame {f}", fontsize=7)
    fig.tight_layout()
    return _save(fig, path, dpi=80)


def save_rs_grid_figure(path: Path, grids: dict[str, dict[str, dict[tuple[str, str], float]]],
                        metric_names: dict[str, str]) -> Path:
    """The resize-and-normalization grid: one panel per data set, one group of bars per
    normalization, a bar per (encoder, size). ``grids[dataset][encoder][(size, norm)]`` is
    the kNN score; ``metric_names[dataset]`` labels its axis."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(grids), figsize=(5.5 * len(grids), 4.8), squeeze=False)
    colours = plt.get_cmap("tab20").colors
    for ax, (dataset, by_encoder) in zip(axes[0], grids.items(), strict=True):
        cells = sorted({cell for grid in by_encoder.values() for cell in grid},
                       key=lambda c: (c[1], int(c[0])))
        norms = list(dict.fromkeys(norm for _, norm in cells))
        bars = [(encoder, size) for encoder in by_encoder
                for size in sorted({s for s, _ in cells}, key=int)]
        width = 0.8 / max(len(bars), 1)
        shown = [v for grid in by_encoder.values() for v in grid.values() if v == v]
        if shown:  # the differences are the point: the axis starts near the lowest bar
            ax.set_ylim(max(0.0, min(shown) - 10.0), min(100.0, max(shown) + 3.0))
        for b, (encoder, size) in enumerate(bars):
            values = [by_encoder[encoder].get((size, norm), float("nan")) for norm in norms]
            ax.bar([i + b * width for i in range(len(norms))], values, width,
                   color=colours[b % 20], label=f"{encoder} @ {size} px")
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(norms))], norms)
        ax.set_title(dataset)
        ax.set_ylabel(metric_names[dataset])
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.1))
    fig.suptitle("kNN-5 of frozen features: input size x normalization")
    fig.tight_layout()
    return _save(fig, path)
