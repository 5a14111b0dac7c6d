"""Values that move during training: cosine from the configured value to `end` over a horizon
of `kimg` thousand real images shown to D, then held at `end` (R3GAN's recipe: lr, Adam's
beta2, the R1/R2 gamma, G_ema's half-life and the augmentation probability).

A schedule has its own horizon, never train.total_kimg: a resume that lengthens the run (a
new total_kimg) must not rescale a schedule mid-run. Every value is a host float computed
from the integer image count, which every rank shares, so the ranks agree and nothing is read
from the device.

How schedules meet the older lr shapes: optim.*.warmup_kimg multiplies the scheduled lr (a
ramp from 0 at the start of the run); optim.*.rampdown_kimg shapes the end of the run as a
schedule does, so the two are refused together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional


@dataclass
class Schedule:
    end: Optional[float] = None  # noqa: UP045 - OmegaConf reads typing.Optional, not `float | None`
    """Value at the end of the horizon (cosine from the key's own value); unset: the value is constant."""
    kimg: float = 0.0
    """Horizon in thousands of real images shown to D, from the start of the run; the value is held at `end` after it."""


def cosine(start: float, schedule: Schedule, num_images: int) -> float:
    """The scheduled value once `num_images` real images were shown to D."""
    if schedule.end is None:
        return start
    done = min(1.0, num_images / (schedule.kimg * 1000))
    return schedule.end + (start - schedule.end) * 0.5 * (1 + math.cos(math.pi * done))


def check(schedule: Schedule, key: str, low: float, high: float, require) -> None:
    """One-line errors for a schedule at config key `key` whose end must lie in [low, high]."""
    if schedule.end is None:
        require(schedule.kimg == 0, f"{key}.kimg", f"needs {key}.end (the value at the end of the horizon)")
        return
    require(schedule.kimg > 0, f"{key}.kimg", f"must be > 0 when {key}.end is set (the horizon, in kimg)")
    require(low <= schedule.end <= high, f"{key}.end", f"must be in [{low:g}, {high:g}], got {schedule.end:g}")


@dataclass
class Values:
    """Every scheduled value for one step."""

    lr: dict
    beta2: dict
    gamma: float
    ema_half_life_kimg: float
    augment_p: float


def values_at(cfg, num_images: int) -> Values:
    """The values of the step that starts after `num_images` real images."""
    nets = {"G": cfg.optim.generator, "D": cfg.optim.discriminator}
    return Values(
        lr={name: cosine(opt.lr, opt.lr_schedule, num_images) for name, opt in nets.items()},
        beta2={name: cosine(opt.beta2, opt.beta2_schedule, num_images) for name, opt in nets.items()},
        gamma=cosine(cfg.loss.r1_gamma, cfg.loss.gamma_schedule, num_images),
        ema_half_life_kimg=cosine(cfg.train.ema_half_life_kimg, cfg.train.ema_half_life_schedule, num_images),
        augment_p=cosine(augment_p_start(cfg.data), cfg.data.augment_p_schedule, num_images))


def augment_p_start(data) -> float:
    """data.augment_p, or where unset 0 for ADA (which raises it as D overfits) and 1 otherwise."""
    if data.augment_p is not None:
        return data.augment_p
    return 0.0 if data.ada_kimg > 0 else 1.0


def any_moving(cfg) -> bool:
    return any(s.end is not None for s in scheduled(cfg).values())


def scheduled(cfg) -> dict[str, Schedule]:
    """Config key -> schedule, for every value that may move."""
    return {"optim.generator.lr_schedule": cfg.optim.generator.lr_schedule,
            "optim.discriminator.lr_schedule": cfg.optim.discriminator.lr_schedule,
            "optim.generator.beta2_schedule": cfg.optim.generator.beta2_schedule,
            "optim.discriminator.beta2_schedule": cfg.optim.discriminator.beta2_schedule,
            "loss.gamma_schedule": cfg.loss.gamma_schedule,
            "train.ema_half_life_schedule": cfg.train.ema_half_life_schedule,
            "data.augment_p_schedule": cfg.data.augment_p_schedule}
