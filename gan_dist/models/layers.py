"""Small building blocks shared by the architectures (normalisation choices)."""

from __future__ import annotations

import torch.nn as nn
from torch.nn.utils.parametrizations import spectral_norm


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


def label_embedding(num_classes: int, dim: int) -> nn.Embedding | None:
    return nn.Embedding(num_classes, dim) if num_classes else None
