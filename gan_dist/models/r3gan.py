"""`r3gan`: a plain convolutional G and D after the R3GAN baseline (Huang et al., NeurIPS 2024),
written from the paper, pure PyTorch.

Both networks are stages of 2 residual blocks, one stage per resolution from 4x4 to the
image's. A block is an inverted bottleneck: 1x1 conv to twice the channels, grouped 3x3
conv (16 channels per group), 1x1 conv back, leaky ReLU 0.2 after the first two, added to
its input. There is no normalisation anywhere. The last conv of every block starts at zero,
so each block starts as the identity, and the others are He-initialised and scaled by
L^(-1/4) for L blocks in the network (fix-up scaling for branches of 3 layers), so the
output variance does not grow with depth. Between stages G doubles the size and D halves
it with a [1,2,1] x [1,2,1] low-pass filter (zero insertion then the filter; the filter then
stride 2), and a 1x1 conv changes the width where it changes.

G maps z (with the label's embedding when conditional) through a linear layer to one weight
per channel of a learned 4x4 basis, then runs the stages and a 1x1 conv to the image. D runs
a 1x1 conv from the image, the stages down to 4x4, a depthwise 4x4 conv to one value per
channel, and one linear logit, plus the projection term <embed(y), features> when
class-conditional (and InfoGAN's code head on the same features).

Widths at model.width_mult=1: 768 channels at every stage up to 32 px (the paper's CIFAR-10
preset, about 21M parameters each at 32 px), halving per doubling above (64 px 384, 128 px
192, 256 px 96). width_mult=0.0833 gives 64 channels, a CPU demo.

Non-square images (the long side 2 or 4 times the short one, e.g. 32x64) grow from a basis of
4 px on the short side (4x8) and end in D with a depthwise conv of that size; widths follow
the short side.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

from gan_dist.errors import UserError
from gan_dist.models import register_model
from gan_dist.models.layers import LatentInput, Projection, code_head, image_grid

RESOLUTIONS = (16, 32, 64, 128, 256)
GROUP_CHANNELS = 16
EXPANSION = 2
BLOCKS_PER_STAGE = 2
SLOPE = 0.2


def stage_channels(resolution: int, mult: float) -> list[int]:
    """Channels of the stages at 4, 8, ... `resolution` px (a multiple of 8, so the expanded
    width is a whole number of 16-channel groups)."""
    sizes = [4 * 2**i for i in range(int(math.log2(resolution // 4)) + 1)]
    return [max(8, 8 * round(768 * min(1.0, 32 / size) * mult / 8)) for size in sizes]


def _lowpass(channels: int) -> torch.Tensor:
    taps = torch.tensor([1.0, 2.0, 1.0])
    kernel = torch.outer(taps, taps) / 16
    return kernel.expand(channels, 1, 3, 3).contiguous()


class Resample(nn.Module):
    """x2 up (zero insertion, then the filter with gain 4) or /2 down (the filter, stride 2), per channel."""

    def __init__(self, channels: int, up: bool):
        super().__init__()
        self.up, self.channels = up, channels
        self.register_buffer("kernel", _lowpass(channels), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = self.kernel.to(x.dtype)
        if self.up:
            return F.conv_transpose2d(x, kernel * 4, stride=2, padding=1, output_padding=1, groups=self.channels)
        return F.conv2d(x, kernel, stride=2, padding=1, groups=self.channels)


class Block(nn.Module):
    """x + 1x1(lrelu(grouped 3x3(lrelu(1x1(x))))), the last 1x1 starting at zero."""

    def __init__(self, channels: int, num_blocks: int):
        super().__init__()
        hidden = channels * EXPANSION
        self.expand = nn.Conv2d(channels, hidden, 1)
        self.spatial = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden // GROUP_CHANNELS)
        self.project = nn.Conv2d(hidden, channels, 1)
        scale = num_blocks ** -0.25
        for conv in (self.expand, self.spatial):
            nn.init.kaiming_normal_(conv.weight, a=SLOPE, nonlinearity="leaky_relu")
            with torch.no_grad():
                conv.weight.mul_(scale)
            nn.init.zeros_(conv.bias)
        nn.init.zeros_(self.project.weight)
        nn.init.zeros_(self.project.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.leaky_relu(self.expand(x), SLOPE)
        h = F.leaky_relu(self.spatial(h), SLOPE)
        return x + self.project(h)


def _conv1x1(c_in: int, c_out: int) -> nn.Conv2d:
    conv = nn.Conv2d(c_in, c_out, 1)
    nn.init.kaiming_normal_(conv.weight, a=1.0)  # a linear layer: unit gain
    nn.init.zeros_(conv.bias)
    return conv


def _stage(channels: int, num_blocks: int) -> nn.Sequential:
    return nn.Sequential(*[Block(channels, num_blocks) for _ in range(BLOCKS_PER_STAGE)])


class R3GANGenerator(nn.Module):
    def __init__(self, latent_dim: int, out_channels: int, resolution: int, mult: float, num_classes: int = 0,
                 categories: int = 0, base: tuple[int, int] = (4, 4)):
        """`resolution`: the short side; `base`: the basis's height and width (4x8 for 32x64)."""
        super().__init__()
        channels = stage_channels(resolution, mult)
        num_blocks = BLOCKS_PER_STAGE * len(channels)
        self.input = LatentInput(latent_dim, num_classes, categories)
        self.weights = nn.Linear(self.input.out_features, channels[0])
        nn.init.kaiming_normal_(self.weights.weight, a=1.0)
        nn.init.zeros_(self.weights.bias)
        self.basis = nn.Parameter(torch.randn(channels[0], *base))
        layers = [_stage(channels[0], num_blocks)]
        for c_in, c_out in itertools.pairwise(channels):
            layers += [_conv1x1(c_in, c_out) if c_in != c_out else nn.Identity(), Resample(c_out, up=True),
                       _stage(c_out, num_blocks)]
        self.stages = nn.Sequential(*layers)
        self.out = _conv1x1(channels[-1], out_channels)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        h = self.basis * self.weights(self.input(z, labels))[:, :, None, None]
        return self.out(self.stages(h))


class R3GANDiscriminator(nn.Module):
    def __init__(self, in_channels: int, resolution: int, mult: float, num_classes: int = 0, categories: int = 0,
                 base: tuple[int, int] = (4, 4)):
        super().__init__()
        channels = stage_channels(resolution, mult)[::-1]  # from the image's size down to the base
        num_blocks = BLOCKS_PER_STAGE * len(channels)
        layers = [_conv1x1(in_channels, channels[0]), _stage(channels[0], num_blocks)]
        for c_in, c_out in itertools.pairwise(channels):
            layers += [Resample(c_in, up=False), _conv1x1(c_in, c_out) if c_in != c_out else nn.Identity(),
                       _stage(c_out, num_blocks)]
        self.stages = nn.Sequential(*layers)
        features = channels[-1]
        self.basis = nn.Conv2d(features, features, base, groups=features)  # the base size -> one value per channel
        self.head = nn.Linear(features, 1)
        self.projection = Projection(num_classes, features)
        self.code_head = code_head(features, categories)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None, with_code: bool = False):
        h = self.basis(self.stages(x)).flatten(1)
        logits = self.head(h).flatten() + self.projection(h, labels)
        return (logits, self.code_head(h)) if with_code else logits


@register_model("r3gan")
def build_r3gan(cfg, shape: tuple[int, ...], num_classes: int):
    short, *base = image_grid(shape, "r3gan", RESOLUTIONS)
    if cfg.g_norm != "none" or cfg.d_norm != "none":
        raise UserError("model.name=r3gan has no normalisation layers: set model.g_norm=none and model.d_norm=none")
    G = R3GANGenerator(cfg.latent_dim, shape[0], short, cfg.width_mult, num_classes, cfg.num_latent_categories,
                       tuple(base))
    D = R3GANDiscriminator(shape[0], short, cfg.width_mult, num_classes, cfg.num_latent_categories, tuple(base))
    return G, D
