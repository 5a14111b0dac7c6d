"""Augmentation on the device: a dataset flip for real images, and DiffAugment before D.

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
probability p and passed through unchanged otherwise.
"""

from __future__ import annotations

import torch

from gan_dist.errors import UserError
from gan_dist.seeds import derive_seed

POLICIES = ("color", "translation", "cutout")
FLIP_PURPOSE, DIFFAUG_PURPOSE = 20, 21


def parse_policy(text: str) -> list[str]:
    names = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in names if p not in POLICIES]
    if unknown:
        raise UserError(f"data.diffaugment: unknown augmentation {unknown[0]!r}; use a comma list of "
                        f"{', '.join(POLICIES)} (or '' for none)")
    return names


class Augment:
    def __init__(self, hflip: bool, policy: str, seed: int, rank: int, device: torch.device):
        self.hflip, self.policy = hflip, parse_policy(policy)
        self.p = 1.0  # set by the trainer every step (data.augment_p and its schedule)
        self.flip_gen = torch.Generator(device).manual_seed(derive_seed(seed, rank, FLIP_PURPOSE))
        self.gen = torch.Generator(device).manual_seed(derive_seed(seed, rank, DIFFAUG_PURPOSE))

    def flip_real(self, x: torch.Tensor) -> torch.Tensor:
        if not self.hflip or x.dim() != 4:
            return x
        flip = torch.rand(len(x), device=x.device, generator=self.flip_gen) < 0.5
        return torch.where(flip[:, None, None, None], x.flip(3), x)

    def before_d(self, x: torch.Tensor) -> torch.Tensor:
        if not self.policy or x.dim() != 4 or self.p <= 0:
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
