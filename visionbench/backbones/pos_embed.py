"""Fixed 2-D sine-cosine position embeddings in MAE's layout.

Follows facebookresearch/mae ``util/pos_embed.py``: the grid is built with ``meshgrid(w, h)``
so its first plane holds the column index, the first half of the channels encodes that plane
and the second half the other; each half is ``[sin(pos * omega), cos(pos * omega)]`` with
``omega_d = 1 / 10000^(d / (D/4))``. With a class token, slot 0 is all zeros.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def sincos_1d(embed_dim: int, positions: np.ndarray) -> np.ndarray:
    if embed_dim % 2:
        raise ValueError(f"sin-cos embedding needs an even dimension, got {embed_dim}")
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    angles = np.einsum("m,d->md", positions.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_2d(
    embed_dim: int, grid_size: int | tuple[int, int], cls_token: bool = False
) -> np.ndarray:
    """(grid_h * grid_w [+1], embed_dim) float64 array, rows in raster order."""
    gh, gw = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
    if embed_dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs a dimension divisible by 4, got {embed_dim}")
    grid = np.meshgrid(np.arange(gw, dtype=np.float32), np.arange(gh, dtype=np.float32))
    first, second = grid[0], grid[1]  # first: column index (MAE's "w goes first")
    emb = np.concatenate(
        [sincos_1d(embed_dim // 2, first), sincos_1d(embed_dim // 2, second)], axis=1
    )
    if cls_token:
        emb = np.concatenate([np.zeros((1, embed_dim)), emb], axis=0)
    return emb


def fixed_sincos_(
    pos_embed: torch.nn.Parameter, grid_size: tuple[int, int], num_prefix: int
) -> None:
    """Fill a (1, prefix + N, D) position embedding with MAE's sin-cos values; freeze it."""
    emb = sincos_2d(pos_embed.shape[-1], grid_size, cls_token=False)
    with torch.no_grad():
        pos_embed.zero_()
        pos_embed[0, num_prefix:].copy_(torch.from_numpy(emb).to(pos_embed))
    pos_embed.requires_grad_(False)


def resize_pos_embed(
    pos_embed: torch.Tensor, new_grid: tuple[int, int], num_prefix: int
) -> torch.Tensor:
    """Bicubic resize of the patch part of a (1, prefix + N, D) embedding, as MAE's
    ``interpolate_pos_embed`` does when fine-tuning at another resolution."""
    prefix, patches = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
    old = int(round(patches.shape[1] ** 0.5))
    if old * old != patches.shape[1]:
        raise ValueError(f"cannot resize a non-square position grid of {patches.shape[1]} tokens")
    if (old, old) == tuple(new_grid):
        return pos_embed
    dim = patches.shape[-1]
    grid = patches.reshape(1, old, old, dim).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=new_grid, mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, dim).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)
