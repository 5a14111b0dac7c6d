"""Sample grids as PNG: image tiles for images, a scatter plot for 2-D points.

The layout of every grid (a run's samples/*.png and `gan-dist sample --out grid.png`): the
samples in order, ceil(sqrt(N)) to a row, each tile framed by a 1-pixel border of dark grey
(64, 64, 64) that also rings the grid and fills the unused places of its last row; then
the whole grid, border included, is enlarged by pixel repetition, 32 // size times (8 px
samples 4x, 16 px 2x, 17 px and more as they are). 2-D points are one 512 px scatter plot.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image

LATEST_GRID = "latest.png"


def to_uint8(samples: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8 the way the data was stored (rounded, clamped)."""
    return ((samples.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def image_grid(samples: torch.Tensor, scale: int = 1) -> np.ndarray:
    """[N, C, H, W] in [-1, 1] -> HWC uint8 grid, ceil(sqrt(N)) tiles a row, each framed by a
    1-pixel dark grey border (scale pixels once upscaled by nearest neighbour)."""
    from torchvision.utils import make_grid

    nrow = math.ceil(math.sqrt(len(samples)))
    grid = make_grid(to_uint8(samples.cpu()), nrow=nrow, padding=1, pad_value=64)
    array = grid.permute(1, 2, 0).numpy()
    return array.repeat(scale, axis=0).repeat(scale, axis=1)


def scatter_grid(points: torch.Tensor, size: int = 512, extent: float | None = None) -> np.ndarray:
    """2-D points drawn as dots on a white square (for ring8/grid25)."""
    pts = points.float().cpu().numpy()
    extent = extent or max(1.5, float(np.abs(pts).max()) * 1.1 if len(pts) else 1.5)
    image = np.full((size, size, 3), 255, dtype=np.uint8)
    pix = ((pts / extent + 1) * 0.5 * (size - 1)).round().astype(int)
    inside = (pix >= 1).all(1) & (pix < size - 1).all(1)
    for dx in (-1, 0, 1):
        for dy in (-1, 0, 1):
            image[size - 1 - (pix[inside, 1] + dy), pix[inside, 0] + dx] = (30, 80, 200)
    return image


def save_samples(samples: torch.Tensor, path: Path) -> np.ndarray:
    """Write a grid of samples (images or points) to `path`; returns the HWC array."""
    if samples.dim() == 2:
        array = scatter_grid(samples)
    else:
        side = samples.shape[-1]
        array = image_grid(samples, scale=max(1, 32 // side))  # small samples stay visible
    if array.shape[2] == 1:
        array = array[:, :, 0]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return array


def replace_latest(grid: Path) -> None:
    """samples/latest.png: the newest grid under one name to keep open; an image viewer or a
    sync tool never sees it half written (a copy beside it, renamed over it)."""
    partial = grid.with_name(".latest.png.partial")
    shutil.copyfile(grid, partial)
    os.replace(partial, grid.with_name(LATEST_GRID))
