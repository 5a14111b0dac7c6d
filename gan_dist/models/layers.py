"""Small building blocks shared by the architectures (normalisation choices)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from gan_dist.errors import UserError


def scaled_width(width: int, mult: float) -> int:
    """A hidden width times model.width_mult, at least 1."""
    return max(1, round(width * mult))


def norm_layer(kind: str, features: int, dims: int) -> nn.Module:
    """BatchNorm over `features` (1-d for MLPs, 2-d for convs), or nothing."""
    if kind == "batch":
        return nn.BatchNorm1d(features) if dims == 1 else nn.BatchNorm2d(features)
    return nn.Identity()


def d_layer(layer: nn.Module, d_norm: str) -> nn.Module:
    """Spectral normalisation wraps the weight; the other D norms are separate layers."""
    return spectral_norm(layer) if d_norm == "spectral" else layer


def d_norm_layer(d_norm: str, features: int, dims: int) -> nn.Module:
    return norm_layer("batch" if d_norm == "batch" else "none", features, dims)


def latent_code(z: torch.Tensor, categories: int) -> torch.Tensor:
    """The categorical code carried by z: the argmax of its first `categories` coordinates
    (uniform over the categories for Gaussian z)."""
    return z[:, :categories].argmax(dim=1)


class LatentInput(nn.Module):
    """G's input: z, with a learned label embedding of the same size appended when conditional,
    and a one-hot categorical code read off z when `categories` > 0.

    The code is the argmax of z's first `categories` coordinates, so it is uniform over the
    categories and every caller keeps drawing plain Gaussian z. A continuous map from a
    Gaussian cannot cover disconnected modes (the ten digits) without spending samples on the
    bridges between them; a discrete input lets G jump between modes instead.
    """

    def __init__(self, latent_dim: int, num_classes: int = 0, categories: int = 0):
        super().__init__()
        self.embed = nn.Embedding(num_classes, latent_dim) if num_classes else None
        self.categories = categories
        self.out_features = latent_dim * (2 if num_classes else 1) + categories

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        parts = [z]
        if self.embed is not None:
            parts.append(self.embed(labels))
        if self.categories:
            code = latent_code(z, self.categories)
            # A comparison, not F.one_hot: that checks its indices' range on the host (a sync on GPUs).
            categories = torch.arange(self.categories, device=code.device)
            parts.append((code[:, None] == categories).to(z.dtype))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def code_head(features: int, categories: int) -> nn.Linear | None:
    """InfoGAN's Q: D's features -> logits of the categorical code (model.num_latent_categories)."""
    return nn.Linear(features, categories) if categories else None


class Projection(nn.Module):
    """The projection discriminator's class term <embed(y), features> (Miyato & Koyama 2018)."""

    def __init__(self, num_classes: int, features: int):
        super().__init__()
        self.embed = nn.Embedding(num_classes, features) if num_classes else None

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor | float:
        return 0.0 if self.embed is None else (self.embed(labels) * features).sum(1)


def group_variance(grouped: torch.Tensor) -> torch.Tensor:
    """Population variance over dim 0. Written out rather than Tensor.var(dim=0), whose CPU
    kernel (forward and backward) took 8x as long and a fifth of a 2-D mixture's step
    (bench/minibatch_std.py, docs/benchmarks.md)."""
    return (grouped - grouped.mean(dim=0)).square().mean(dim=0)


class MinibatchStd(nn.Module):
    """Append one feature: the mean over features of the std over a group of samples
    (StyleGAN's minibatch standard deviation), so D can see a lack of variety and G is
    pushed away from collapse. Groups are formed within each process's micro-batch."""

    def __init__(self, group_size: int):
        super().__init__()
        self.group_size = group_size

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        n = h.shape[0]
        group = min(self.group_size, n)
        while n % group:
            group -= 1
        grouped = h.reshape(group, n // group, *h.shape[1:])
        std = (group_variance(grouped) + 1e-8).sqrt().flatten(1).mean(1)  # [n // group]
        extra = std.repeat(group).reshape(n, *([1] * (h.dim() - 1))).expand(n, 1, *h.shape[2:])
        return torch.cat([h, extra], dim=1)


def grows_from_4px(shape: tuple[int, ...], short_sides: tuple[int, ...] = (16, 32, 64, 128, 256)) -> bool:
    """Whether C x H x W images suit a conv net that grows from a 4 px short side: the short
    side one of `short_sides`, the long side 1, 2 or 4 times it."""
    if len(shape) != 3:
        return False
    height, width = shape[1:]
    short, ratio = min(height, width), max(height, width) // max(1, min(height, width))
    return short in short_sides and ratio in (1, 2, 4) and max(height, width) == short * ratio


def image_grid(shape: tuple[int, ...], model: str, short_sides: tuple[int, ...]) -> tuple[int, int, int]:
    """(short side, base height, base width) of a conv net that grows from a 4 px short side
    (32x64 grows from 4x8). One message names what to prepare otherwise."""
    if grows_from_4px(shape, short_sides):
        short = min(shape[1:])
        return short, 4 * shape[1] // short, 4 * shape[2] // short
    sides = ", ".join(map(str, short_sides))
    raise UserError(f"model.name={model} needs images of C x H x W whose shorter side is {sides} px and whose "
                    f"longer side is 1, 2 or 4 times it, but the data has samples of shape {list(shape)}; prepare "
                    f"the data with --resolution 32 (or e.g. 32x64, height first)")
