"""`resnet`: SNGAN-style residual G and D (Miyato et al. 2018) for 32 and 64 px.

G: z -> 4x4 map, then residual up-blocks (BatchNorm, ReLU, nearest upsampling, 3x3 convs,
with a 1x1 shortcut), BatchNorm, ReLU, a 3x3 conv to the image, Tanh. D: residual
down-blocks (ReLU, 3x3 convs, average pooling; the first one without the leading ReLU),
ReLU, a sum over positions and one linear logit, plus the projection term
<embed(y), features> when class-conditional. Use it with d_norm=spectral and the hinge loss,
as the paper did. Widths at width_mult=1: 32 px, G 256 and D 128 channels throughout (the
CIFAR-10 model); 64 px, G 512..64 and D 64..512, halving/doubling per block.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from gan_dist.errors import UserError
from gan_dist.models import register_model
from gan_dist.models.layers import (
    LatentInput,
    Projection,
    code_head,
    d_layer,
    norm_layer,
    scaled_width,
)

RESOLUTIONS = (32, 64)


def _g_channels(resolution: int, mult: float) -> list[int]:
    """Channels at 4x4 and after each up-block."""
    if resolution == 32:
        return [scaled_width(256, mult)] * 4
    return [scaled_width(c, mult) for c in (512, 512, 256, 128, 64)]


def _d_channels(resolution: int, mult: float) -> list[int]:
    """Channels after each block (all but the last halve the size)."""
    if resolution == 32:
        return [scaled_width(128, mult)] * 4
    return [scaled_width(c, mult) for c in (64, 128, 256, 512, 512)]


class UpBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, g_norm: str):
        super().__init__()
        self.main = nn.Sequential(
            norm_layer(g_norm, c_in, 2), nn.ReLU(), nn.Upsample(scale_factor=2),
            nn.Conv2d(c_in, c_out, 3, 1, 1), norm_layer(g_norm, c_out, 2), nn.ReLU(),
            nn.Conv2d(c_out, c_out, 3, 1, 1))
        self.shortcut = nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(c_in, c_out, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x) + self.shortcut(x)


class DownBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, d_norm: str, down: bool, first: bool):
        super().__init__()
        pool = [nn.AvgPool2d(2)] if down else []
        # The first block sees the image: no ReLU before its first conv, and it pools first
        # in the shortcut (the "optimized" block of the paper).
        self.main = nn.Sequential(
            *([] if first else [nn.ReLU()]), d_layer(nn.Conv2d(c_in, c_out, 3, 1, 1), d_norm), nn.ReLU(),
            d_layer(nn.Conv2d(c_out, c_out, 3, 1, 1), d_norm), *pool)
        if c_in == c_out and not down:
            self.shortcut = nn.Identity()
        elif first:
            self.shortcut = nn.Sequential(*pool, d_layer(nn.Conv2d(c_in, c_out, 1), d_norm))
        else:
            self.shortcut = nn.Sequential(d_layer(nn.Conv2d(c_in, c_out, 1), d_norm), *pool)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x) + self.shortcut(x)


class ResNetGenerator(nn.Module):
    def __init__(self, latent_dim: int, out_channels: int, resolution: int, mult: float, g_norm: str,
                 num_classes: int = 0, categories: int = 0):
        super().__init__()
        ch = _g_channels(resolution, mult)
        self.input = LatentInput(latent_dim, num_classes, categories)
        self.linear = nn.Linear(self.input.out_features, 4 * 4 * ch[0])
        self.blocks = nn.Sequential(*[UpBlock(a, b, g_norm) for a, b in itertools.pairwise(ch)])
        self.out = nn.Sequential(norm_layer(g_norm, ch[-1], 2), nn.ReLU(), nn.Conv2d(ch[-1], out_channels, 3, 1, 1),
                                 nn.Tanh())
        self.start_channels = ch[0]

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        h = self.linear(self.input(z, labels)).view(len(z), self.start_channels, 4, 4)
        return self.out(self.blocks(h))


class ResNetDiscriminator(nn.Module):
    def __init__(self, in_channels: int, resolution: int, mult: float, d_norm: str, num_classes: int = 0,
                 categories: int = 0):
        super().__init__()
        ch = _d_channels(resolution, mult)
        blocks, c_in = [], in_channels
        for i, c_out in enumerate(ch):
            # 32 px: 32 -> 16 -> 8 -> 8 -> 8 (SNGAN's CIFAR D); 64 px: halve down to 4x4.
            down = i < 2 if resolution == 32 else i < len(ch) - 1
            blocks.append(DownBlock(c_in, c_out, d_norm, down, first=i == 0))
            c_in = c_out
        self.blocks = nn.Sequential(*blocks, nn.ReLU())
        self.head = d_layer(nn.Linear(c_in, 1), d_norm)
        self.projection = Projection(num_classes, c_in)
        self.code_head = code_head(c_in, categories)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None, with_code: bool = False):
        h = self.blocks(x).sum((2, 3))
        logits = self.head(h).flatten() + self.projection(h, labels)
        return (logits, self.code_head(h)) if with_code else logits


def _init(module: nn.Module) -> None:
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        weight = module.parametrizations.weight.original if hasattr(module, "parametrizations") else module.weight
        nn.init.xavier_uniform_(weight)
        nn.init.zeros_(module.bias)


@register_model("resnet")
def build_resnet(cfg, shape: tuple[int, ...], num_classes: int):
    if len(shape) != 3 or shape[1] != shape[2] or shape[1] not in RESOLUTIONS:
        raise UserError(f"model.name=resnet needs square images of 32 or 64 px, but the data has samples of "
                        f"shape {list(shape)}; prepare the data with --resolution 32 (or 64)")
    if cfg.d_norm == "batch":
        raise UserError("model.name=resnet takes model.d_norm=spectral (the paper's) or none, not batch")
    G = ResNetGenerator(cfg.latent_dim, shape[0], shape[1], cfg.width_mult, cfg.g_norm, num_classes,
                        cfg.num_latent_categories)
    D = ResNetDiscriminator(shape[0], shape[1], cfg.width_mult, cfg.d_norm, num_classes, cfg.num_latent_categories)
    G.apply(_init)
    D.apply(_init)
    return G, D
