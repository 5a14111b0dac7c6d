"""DCGAN (Radford et al.) G and D for 16, 32 and 64 px, with a width multiplier.

G: z -> 4x4 transposed conv, then stride-2 transposed convs doubling the resolution and
halving the channels, Tanh. D mirrors it with stride-2 convs and LeakyReLU 0.2, ending in
a 4x4 conv to one logit. Class-conditional: a label embedding concatenated to z in G, and
a projection term <embed(y), features> in D. Non-square images (long side 2 or 4 times the
short one) start from 4x8 or 4x16 and end in a conv of that size.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import nn

from gan_dist.models import register_model
from gan_dist.models.layers import (
    LatentInput,
    Projection,
    code_head,
    d_layer,
    d_norm_layer,
    image_grid,
    norm_layer,
    scaled_width,
)

RESOLUTIONS = (16, 32, 64)
BASE_CHANNELS = 64


def _channels(resolution: int, base: int) -> list[int]:
    """Channels at 4x4, 8x8, ... up to resolution/2, widest first (e.g. 32 px: 4c, 2c, c)."""
    num_up = int(math.log2(resolution // 4))
    return [base * 2**k for k in reversed(range(num_up))]


class DCGANGenerator(nn.Module):
    def __init__(self, latent_dim: int, out_channels: int, resolution: int, base: int,
                 g_norm: str, num_classes: int = 0, categories: int = 0, start: tuple[int, int] = (4, 4)):
        super().__init__()
        self.input = LatentInput(latent_dim, num_classes, categories)
        ch = _channels(resolution, base)
        in_dim = self.input.out_features
        layers = [nn.ConvTranspose2d(in_dim, ch[0], start, 1, 0, bias=g_norm == "none"),
                  norm_layer(g_norm, ch[0], 2), nn.ReLU(True)]
        for c_in, c_out in itertools.pairwise(ch):
            layers += [nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=g_norm == "none"),
                       norm_layer(g_norm, c_out, 2), nn.ReLU(True)]
        layers += [nn.ConvTranspose2d(ch[-1], out_channels, 4, 2, 1), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        z = self.input(z, labels)
        return self.net(z[:, :, None, None])


class DCGANDiscriminator(nn.Module):
    def __init__(self, in_channels: int, resolution: int, base: int, d_norm: str, num_classes: int = 0,
                 categories: int = 0, start: tuple[int, int] = (4, 4)):
        super().__init__()
        ch = list(reversed(_channels(resolution, base)))  # c, 2c, ... at resolution/2 .. the start size
        layers = [d_layer(nn.Conv2d(in_channels, ch[0], 4, 2, 1), d_norm), nn.LeakyReLU(0.2, True)]
        for c_in, c_out in itertools.pairwise(ch):
            layers += [d_layer(nn.Conv2d(c_in, c_out, 4, 2, 1, bias=d_norm != "batch"), d_norm),
                       d_norm_layer(d_norm, c_out, 2), nn.LeakyReLU(0.2, True)]
        self.features = nn.Sequential(*layers)
        self.head = d_layer(nn.Conv2d(ch[-1], 1, start, 1, 0), d_norm)
        self.projection = Projection(num_classes, ch[-1])
        self.code_head = code_head(ch[-1] * start[0] * start[1], categories)  # on the flattened start-size features

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None, with_code: bool = False):
        h = self.features(x)
        logits = self.head(h).flatten() + self.projection(h.sum((2, 3)), labels)
        return (logits, self.code_head(h.flatten(1))) if with_code else logits


def init_dcgan_weights(module: nn.Module) -> None:
    """N(0, 0.02) for convs, N(1, 0.02) for BatchNorm scales, as in the DCGAN paper."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        weight = module.parametrizations.weight.original if hasattr(module, "parametrizations") else module.weight
        nn.init.normal_(weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


@register_model("dcgan")
def build_dcgan(cfg, shape: tuple[int, ...], num_classes: int):
    short, *start = image_grid(shape, "dcgan", RESOLUTIONS)
    base = scaled_width(BASE_CHANNELS, cfg.width_mult)
    G = DCGANGenerator(cfg.latent_dim, shape[0], short, base, cfg.g_norm, num_classes, cfg.num_latent_categories,
                       tuple(start))
    D = DCGANDiscriminator(shape[0], short, base, cfg.d_norm, num_classes, cfg.num_latent_categories, tuple(start))
    G.apply(init_dcgan_weights)
    D.apply(init_dcgan_weights)
    return G, D
