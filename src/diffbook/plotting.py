"""Pictures: image grids and the book's figure defaults."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import torch


def image_grid(images: torch.Tensor, nrow: int = 8, padding: int = 1, pad_value: float = 1.0) -> np.ndarray:
    """Tile ``(N, C, H, W)`` images in [−1, 1] into one ``(rows·H, nrow·W[, C])`` array in [0, 1]."""
    if images.ndim != 4:
        raise ValueError(f"expected images of shape (N, C, H, W), got {tuple(images.shape)}")
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) / 2).numpy()
    n, c, h, w = x.shape
    rows = -(-n // nrow)
    grid = np.full((c, rows * (h + padding) + padding, nrow * (w + padding) + padding), pad_value, dtype=np.float32)
    for i in range(n):
        r, col = divmod(i, nrow)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[:, top:top + h, left:left + w] = x[i]
    return grid[0] if c == 1 else grid.transpose(1, 2, 0)


def show_images(images: torch.Tensor, nrow: int = 8, title: str | None = None, ax: plt.Axes | None = None,
                scale: float = 0.45) -> plt.Axes:
    """Show a grid of images in [−1, 1] (greyscale for one channel) on ``ax`` or a new figure."""
    grid = image_grid(images, nrow)
    if ax is None:
        _, ax = plt.subplots(figsize=(scale * nrow, scale * grid.shape[0] / grid.shape[1] * nrow))
    ax.imshow(grid, cmap="gray" if grid.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title)
    return ax
