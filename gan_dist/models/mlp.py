"""The tutorial's fully connected GAN, with D returning logits (no Sigmoid).

G: latent -> 256 -> 512 -> 1024 -> pixels (LeakyReLU 0.2, Tanh); D: pixels -> 512 -> 256 -> 1.
`model.width_mult` scales the hidden widths; the tutorial is width_mult=1, g_norm=none.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from gan_dist.models import register_model
from gan_dist.models.layers import (
    LatentInput,
    MinibatchStd,
    Projection,
    code_head,
    d_layer,
    d_norm_layer,
    norm_layer,
    scaled_width,
)

G_HIDDEN = (256, 512, 1024)
D_HIDDEN = (512, 256)


class MLPGenerator(nn.Module):
    def __init__(self, latent_dim: int, shape: tuple[int, ...], hidden: list[int], g_norm: str,
                 num_classes: int = 0, categories: int = 0):
        super().__init__()
        self.shape = shape
        self.input = LatentInput(latent_dim, num_classes, categories)
        layers, width = [], self.input.out_features
        for out in hidden:
            layers += [nn.Linear(width, out), norm_layer(g_norm, out, 1), nn.LeakyReLU(0.2)]
            width = out
        layers += [nn.Linear(width, math.prod(shape)), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        z = self.input(z, labels)
        return self.net(z).view(-1, *self.shape)


class MLPDiscriminator(nn.Module):
    def __init__(self, shape: tuple[int, ...], hidden: list[int], d_norm: str, num_classes: int = 0,
                 dropout: float = 0.0, minibatch_std: int = 0, categories: int = 0):
        super().__init__()
        layers, width = [], math.prod(shape)
        for out in hidden:
            layers += [d_layer(nn.Linear(width, out), d_norm), d_norm_layer(d_norm, out, 1),
                       nn.LeakyReLU(0.2), nn.Dropout(dropout) if dropout else nn.Identity()]
            width = out
        self.features = nn.Sequential(*layers)
        self.batch_std = MinibatchStd(minibatch_std) if minibatch_std else nn.Identity()
        self.head = d_layer(nn.Linear(width + (1 if minibatch_std else 0), 1), d_norm)
        self.projection = Projection(num_classes, width)
        self.code_head = code_head(width, categories)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None, with_code: bool = False):
        h = self.features(x.flatten(1))
        logits = self.head(self.batch_std(h)).squeeze(1) + self.projection(h, labels)
        return (logits, self.code_head(h)) if with_code else logits


@register_model("mlp")
def build_mlp(cfg, shape: tuple[int, ...], num_classes: int):
    g_hidden = [scaled_width(w, cfg.width_mult) for w in G_HIDDEN]
    d_hidden = [scaled_width(w, cfg.width_mult) for w in D_HIDDEN]
    G = MLPGenerator(cfg.latent_dim, shape, g_hidden, cfg.g_norm, num_classes, cfg.num_latent_categories)
    D = MLPDiscriminator(shape, d_hidden, cfg.d_norm, num_classes, cfg.d_dropout, cfg.d_minibatch_std,
                          cfg.num_latent_categories)
    return G, D
