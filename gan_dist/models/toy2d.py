"""`mlp2d`: small fully connected G and D for the 2-D Gaussian mixtures (ring8, grid25).

The sizes follow the PacGAN/VEEGAN experiments: a few hidden layers of a few hundred
units, ReLU in G, LeakyReLU in D, a linear output for G (points are not bounded to [-1, 1]).
"""

from __future__ import annotations

import torch
from torch import nn

from gan_dist.errors import UserError
from gan_dist.models import register_model
from gan_dist.models.layers import LatentInput, norm_layer, scaled_width
from gan_dist.models.mlp import MLPDiscriminator

HIDDEN = (400, 400, 400)


class PointGenerator(nn.Module):
    def __init__(self, latent_dim: int, hidden: list[int], g_norm: str, num_classes: int = 0, categories: int = 0):
        super().__init__()
        self.input = LatentInput(latent_dim, num_classes, categories)
        layers, width = [], self.input.out_features
        for out in hidden:
            layers += [nn.Linear(width, out), norm_layer(g_norm, out, 1), nn.ReLU()]
            width = out
        layers.append(nn.Linear(width, 2))
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        z = self.input(z, labels)
        return self.net(z)


@register_model("mlp2d")
def build_mlp2d(cfg, shape: tuple[int, ...], num_classes: int):
    if tuple(shape) != (2,):
        raise UserError(f"model.name=mlp2d generates 2-D points but the data has samples of shape "
                        f"{list(shape)}; use model.name=mlp or dcgan for images")
    hidden = [scaled_width(w, cfg.width_mult) for w in HIDDEN]
    G = PointGenerator(cfg.latent_dim, hidden, cfg.g_norm, num_classes, cfg.num_latent_categories)
    D = MLPDiscriminator(shape, hidden, cfg.d_norm, num_classes, cfg.d_dropout, cfg.d_minibatch_std,
                         cfg.num_latent_categories)
    return G, D
