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
    """Per-step decay that halves a weight's influence every `half_life_kimg` thousand images
    (0: no averaging, G_ema is G)."""
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
        self.started = False  # host-side: has the first update (a copy) happened
        self._source, self._lists = None, ()
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
    def update(self, G: nn.Module, num_images: int, batch_size: int, half_life_kimg: float | None = None) -> None:
        """`half_life_kimg`: this step's (scheduled) half-life, else the configured one."""
        half_life = self.half_life_kimg if half_life_kimg is None else half_life_kimg
        decay = ema_decay(num_images, batch_size, half_life, self.rampup)
        if self._float_G is not None:
            torch._foreach_copy_(list(self._float_G.parameters()), list(G.parameters()))
            for mine, theirs in zip(self._float_G.buffers(), G.buffers(), strict=True):
                mine.copy_(theirs)
            G = self._float_G
        if not self.started:  # the library's first update: an exact copy of G
            self.averaged.update_parameters(G)
            self.started = True
            return
        # Later updates call the library's EMA kernel directly: update_parameters() tests its
        # counter (`n_averaged == 0`, a tensor that follows the module to the GPU) on the host
        # every step, a synchronisation in the hot loop.
        if self._source is not G:  # tensor lists built once per source module, not every step
            self._source = G
            self._lists = (list(self.module.parameters()), list(G.parameters()),
                           list(self.module.buffers()), list(G.buffers()))
        mine, theirs, my_buffers, their_buffers = self._lists
        get_ema_multi_avg_fn(decay)(mine, theirs, None)
        if my_buffers:  # as update_parameters(use_buffers=False) does: buffers follow G
            torch._foreach_copy_(my_buffers, their_buffers)
        self.averaged.n_averaged += 1

    def restore(self, num_averaged: int) -> None:
        self.averaged.n_averaged.fill_(num_averaged)
        self.started = num_averaged > 0
