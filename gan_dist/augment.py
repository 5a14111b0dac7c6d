"""Augmentation on the device: a dataset flip for real images, and before D either DiffAugment
or ADA's pipeline (gan_dist/ada.py), with p fixed, scheduled or adapted (`AdaptiveP`).

`flip_real` mirrors real images left-right with probability 1/2 (a dataset augmentation:
only reals, only where the data is symmetric). `before_d` applies the differentiable
augmentations of Zhao et al. 2020 to everything D sees, reals and fakes, in the D and the G
phase alike, so D never learns the augmentation and G's gradients flow through it:
- color: brightness shift in [-0.5, 0.5], saturation scale in [0, 2] (RGB only), contrast
  scale in [0.5, 1.5];
- translation: shift by up to 1/8 of the size in each direction, filling with -1 (black);
- cutout: a square of half the size set to 0, at a random place.
Each draw comes from a generator seeded by (train.seed, GLOBAL rank), so every rank differs.
With `p` below 1 (data.augment_p, which may be scheduled) each image is augmented with
probability p and passed through unchanged otherwise. ADA's pipeline (data.augment) takes p
per operation instead, and data.ada_kimg > 0 adapts it to D's overfitting (`AdaptiveP`).
"""

from __future__ import annotations

import torch

from gan_dist import ada
from gan_dist.augment_names import parse_pipeline, parse_policy
from gan_dist.seeds import derive_seed

FLIP_PURPOSE, DIFFAUG_PURPOSE = 20, 21
# ADA's default targets by whether the loss is shift-invariant: the paired signal reads 0.77
# where D(real) alone reads 0.6 (docs/training.md).
ADA_TARGETS = {False: 0.6, True: 0.75}


class Augment:
    def __init__(self, hflip: bool, policy: str, seed: int, rank: int, device: torch.device, pipeline: str = ""):
        self.hflip, self.policy, self.ops = hflip, parse_policy(policy), parse_pipeline(pipeline)
        # Set by the trainer every step: a float (data.augment_p, its schedule) or AdaptiveP's
        # device tensor, which is never read on the host here.
        self.p: float | torch.Tensor = 1.0
        self.flip_gen = torch.Generator(device).manual_seed(derive_seed(seed, rank, FLIP_PURPOSE))
        self.gen = torch.Generator(device).manual_seed(derive_seed(seed, rank, DIFFAUG_PURPOSE))

    def flip_real(self, x: torch.Tensor) -> torch.Tensor:
        if not self.hflip or x.dim() != 4:
            return x
        flip = torch.rand(len(x), device=x.device, generator=self.flip_gen) < 0.5
        return torch.where(flip[:, None, None, None], x.flip(3), x)

    def before_d(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or (isinstance(self.p, float) and self.p <= 0):
            return x
        if self.ops:
            return ada.augment(x, self.ops, self.p, self.gen)[0]
        if not self.policy:
            return x
        # The choice is drawn before the augmentations, so p=1 draws nothing and keeps the stream.
        chosen = self._uniform(x, 1, 1, 1) < self.p if self.p < 1 else None
        augmented = x
        for name in self.policy:
            augmented = getattr(self, f"_{name}")(augmented)
        return augmented if chosen is None else torch.where(chosen, augmented, x)

    def _uniform(self, x: torch.Tensor, *shape: int) -> torch.Tensor:
        return torch.rand(len(x), *shape, device=x.device, dtype=x.dtype, generator=self.gen)

    def _color(self, x: torch.Tensor) -> torch.Tensor:
        x = x + (self._uniform(x, 1, 1, 1) - 0.5)
        if x.shape[1] == 3:
            mean = x.mean(dim=1, keepdim=True)
            x = (x - mean) * (self._uniform(x, 1, 1, 1) * 2) + mean
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        return (x - mean) * (self._uniform(x, 1, 1, 1) + 0.5) + mean

    def _translation(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        pad_h, pad_w = max(1, h // 8), max(1, w // 8)
        padded = torch.nn.functional.pad(x, (pad_w, pad_w, pad_h, pad_h), value=-1.0)
        dy = torch.randint(0, 2 * pad_h + 1, (n, 1, 1), device=x.device, generator=self.gen)
        dx = torch.randint(0, 2 * pad_w + 1, (n, 1, 1), device=x.device, generator=self.gen)
        rows = torch.arange(h, device=x.device).view(1, h, 1) + dy
        cols = torch.arange(w, device=x.device).view(1, 1, w) + dx
        batch = torch.arange(n, device=x.device).view(n, 1, 1)
        return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)

    def _cutout(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        size_h, size_w = max(1, h // 2), max(1, w // 2)
        top = torch.randint(0, h - size_h + 1, (n, 1, 1), device=x.device, generator=self.gen)
        left = torch.randint(0, w - size_w + 1, (n, 1, 1), device=x.device, generator=self.gen)
        rows = torch.arange(h, device=x.device).view(1, h, 1)
        cols = torch.arange(w, device=x.device).view(1, 1, w)
        hole = (rows >= top) & (rows < top + size_h) & (cols >= left) & (cols < left + size_w)
        return x * (~hole).unsqueeze(1).to(x.dtype)


class AdaptiveP:
    """StyleGAN2-ADA's controller of p, on the device: every `interval_d_steps` D steps, p moves
    by sign(r - target) * p_step_per_adjustment (the images of those steps over ada_kimg *
    1000), within [0, 1].

    r is E[sign(D(real) - undecided)] over the window (undecided: 0 for logit losses, 0.5 for
    least squares), or for a loss that adding a constant to D does not change (relativistic,
    Wasserstein; R1 and R2 do not either) E[sign(D(real) - D(fake))] over the D step's pairs:
    D(real) alone drifts freely there. The sums are each rank's own until `adjust` adds them
    over the ranks, so every rank computes the same p.
    """

    INTERVAL_D_STEPS = 4  # StyleGAN2-ADA: p moves every 4 minibatches

    def __init__(self, p: float, target: float, p_step_per_adjustment: float, loss, device: torch.device):
        self.target, self.p_step = target, p_step_per_adjustment
        self.interval_d_steps = self.INTERVAL_D_STEPS
        self.shift_invariant, self.undecided = loss.shift_invariant, loss.undecided_logit
        self.p = torch.tensor(p, dtype=torch.float32, device=device)
        self.totals = torch.zeros(2, dtype=torch.float32, device=device)  # sum of signs, count
        self.signal = torch.zeros((), dtype=torch.float32, device=device)  # r of the last window

    @classmethod
    def from_config(cls, cfg, loss, device: torch.device) -> AdaptiveP:
        from gan_dist.schedules import augment_p_start

        target = cfg.data.ada_target if cfg.data.ada_target is not None else ADA_TARGETS[loss.shift_invariant]
        images_per_adjustment = cfg.train.batch_size * cls.INTERVAL_D_STEPS
        return cls(augment_p_start(cfg.data), target, images_per_adjustment / (cfg.data.ada_kimg * 1000), loss,
                   device)

    def observe(self, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> None:
        real, fake = real_logits.detach().flatten().float(), fake_logits.detach().flatten().float()
        signs = torch.sign(real - fake) if self.shift_invariant else torch.sign(real - self.undecided)
        self.totals[0] += signs.sum()
        self.totals[1] += signs.numel()

    def adjust(self, reduce_sum) -> None:
        totals = reduce_sum(self.totals.clone())
        self.signal = totals[0] / totals[1].clamp(min=1)
        self.p = (self.p + torch.sign(self.signal - self.target) * self.p_step).clamp(0, 1)
        self.totals.zero_()

    def load(self, state: dict) -> None:
        """p and r of the last window (the same on every rank; float32 values, exact as floats)."""
        self.p = torch.tensor(state["p"], dtype=torch.float32, device=self.p.device)
        self.signal = torch.tensor(state["signal"], dtype=torch.float32, device=self.p.device)

    def load_totals(self, totals: list[float]) -> None:
        self.totals = torch.tensor(totals, dtype=torch.float32, device=self.p.device)
