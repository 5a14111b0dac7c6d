"""Device augmentation: the real-image flip and DiffAugment before D."""

import pytest
import torch

from gan_dist.augment import Augment
from gan_dist.augment_names import parse_policy
from gan_dist.errors import UserError


def _images(n=64, channels=3, size=16):
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_flip_mirrors_about_half_and_nothing_else():
    x = _images()
    out = Augment(True, "", seed=0, rank=0, device=torch.device("cpu")).flip_real(x)
    flipped = [bool(torch.equal(o, xi.flip(2))) for o, xi in zip(out, x)]
    kept = [bool(torch.equal(o, xi)) for o, xi in zip(out, x)]
    assert all(f != k for f, k in zip(flipped, kept)) and 16 < sum(flipped) < 48
    assert torch.equal(Augment(False, "", 0, 0, torch.device("cpu")).flip_real(x), x)


def test_translation_shifts_whole_images_and_fills_black():
    x = _images(n=32)
    out = Augment(False, "translation", 0, 0, torch.device("cpu")).before_d(x)
    for o, xi in zip(out, x):
        shifts = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                  if torch.equal(o[:, 2:-2, 2:-2], xi[:, 2 - dy:14 - dy, 2 - dx:14 - dx])]
        assert len(shifts) == 1
        dy, dx = shifts[0]
        if dy > 0:
            assert torch.all(o[:, :dy] == -1)
        if dx < 0:
            assert torch.all(o[:, :, dx:] == -1)


def test_cutout_zeroes_a_square_of_half_the_size():
    x = _images(n=8) * 0.5 + 0.75  # no zeros of its own
    out = Augment(False, "cutout", 0, 0, torch.device("cpu")).before_d(x)
    assert torch.all((out == 0).sum(dim=(1, 2, 3)) == 3 * 8 * 8)


def test_diffaugment_is_differentiable_seeded_and_rank_dependent():
    x = _images(n=16).requires_grad_(True)
    policy = "color,translation,cutout"
    out = Augment(False, policy, 0, 0, torch.device("cpu")).before_d(x)
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    again = Augment(False, policy, 0, 0, torch.device("cpu")).before_d(x.detach())
    other_rank = Augment(False, policy, 0, 1, torch.device("cpu")).before_d(x.detach())
    assert torch.equal(out.detach(), again) and not torch.equal(again, other_rank)


def test_unknown_policy_names_the_choices():
    assert parse_policy(" color , cutout ") == ["color", "cutout"]
    with pytest.raises(UserError, match="unknown augmentation 'colour'.*color, translation, cutout"):
        parse_policy("colour")
