"""G_ema: an exponential moving average of G's weights, used for every sample and metric.

The decay is derived from the integer image count, not the step count, so the average
means the same thing whatever the batch size: a half-life in thousands of images, capped
early on at a fraction of the images seen so far (ramp-up). Buffers (BatchNorm statistics)
are copied, not averaged. The average lives in fp32 on every rank and is updated from the
unwrapped G after each G step, so all ranks hold the same G_ema.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


def ema_decay(num_images: int, batch_size: int, half_life_kimg: float, rampup: float) -> float:
    """Per-step decay that halves a weight's influence every `half_life_kimg` thousand images."""
    half_life_images = half_life_kimg * 1000.0
    if rampup > 0:
        half_life_images = min(half_life_images, num_images * rampup)
    return 0.5 ** (batch_size / max(half_life_images, 1e-8))


class EMA:
    def __init__(self, G: nn.Module, half_life_kimg: float, rampup: float):
        self.half_life_kimg, self.rampup = half_life_kimg, rampup
        # AveragedModel deep-copies G; its first update copies G's weights exactly.
        self.averaged = AveragedModel(G, use_buffers=False)
        self.averaged.requires_grad_(False).eval()
        # fp32 even when G trains under half precision; a float64 G (tests) stays float64.
        if next(G.parameters()).dtype in (torch.float16, torch.bfloat16):
            self.averaged.module.float()
        # A half-precision G (DeepSpeed's bf16/fp16 engines) is averaged through an fp32 copy:
        # the averaging kernels need both sides in one dtype.
        self._float_G = None
        if next(G.parameters()).dtype != next(self.module.parameters()).dtype:
            self._float_G = copy.deepcopy(self.module)

    @property
    def module(self) -> nn.Module:
        return self.averaged.module

    @torch.no_grad()
    def copy_buffers(self, G: nn.Module) -> None:
        for mine, theirs in zip(self.module.buffers(), G.buffers(), strict=True):
            mine.copy_(theirs)

    @torch.no_grad()
    def update(self, G: nn.Module, num_images: int, batch_size: int) -> None:
        decay = ema_decay(num_images, batch_size, self.half_life_kimg, self.rampup)
        self.averaged.multi_avg_fn = get_ema_multi_avg_fn(decay)
        if self._float_G is not None:
            torch._foreach_copy_(list(self._float_G.parameters()), list(G.parameters()))
            G = self._float_G
        self.averaged.update_parameters(G)
