"""Each loss and regulariser against a value computed by hand."""

import math

import pytest
import torch

from gan_dist.errors import UserError
from gan_dist.losses import LOSSES, code_loss, get_loss, gradient_penalty, interpolate, r1_penalty

REAL = torch.tensor([2.0, -1.0])
FAKE = torch.tensor([0.5, -3.0])


def sp(x: float) -> float:
    return math.log1p(math.exp(x))


HAND = {
    # D: mean softplus(-real) + mean softplus(fake); G variants differ.
    "nonsaturating": ((sp(-2) + sp(1)) / 2 + (sp(0.5) + sp(-3)) / 2, (sp(-0.5) + sp(3)) / 2),
    "minimax": ((sp(-2) + sp(1)) / 2 + (sp(0.5) + sp(-3)) / 2, -(sp(0.5) + sp(-3)) / 2),
    "hinge": ((0 + 2) / 2 + (1.5 + 0) / 2, -(0.5 - 3) / 2),
    "wasserstein": ((0.5 - 3) / 2 - (2 - 1) / 2, -(0.5 - 3) / 2),
    "least_squares": (0.5 * (1 + 4) / 2 + 0.5 * (0.25 + 9) / 2, 0.5 * (0.25 + 16) / 2),
    # Pairs (real 2, fake 0.5) and (real -1, fake -3): D softplus(f - r), G softplus(r - f).
    "relativistic": ((sp(-1.5) + sp(-2)) / 2, (sp(1.5) + sp(2)) / 2),
}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_loss_matches_hand_computation(name):
    loss = get_loss(name)
    want_d, want_g = HAND[name]
    assert loss.d_loss(REAL, FAKE).item() == pytest.approx(want_d, rel=1e-6)
    g_loss = loss.g_loss(FAKE, REAL) if loss.g_reads_real else loss.g_loss(FAKE)
    assert g_loss.item() == pytest.approx(want_g, rel=1e-6)
    assert loss.g_reads_real == (name == "relativistic")


def test_every_registered_loss_has_a_hand_value():
    assert set(HAND) == set(LOSSES)


def test_nonsaturating_is_stable_for_huge_logits():
    huge = torch.tensor([1e4, -1e4])
    assert torch.isfinite(get_loss("nonsaturating").d_loss(huge, -huge))


def test_unknown_loss_suggests_closest():
    with pytest.raises(UserError, match="did you mean 'hinge'"):
        get_loss("hinj")


def test_r1_matches_hand_gradient():
    # D(x) = sum(w * x**2) per sample -> grad = 2 w x; |grad|^2 = 4 sum(w^2 x^2).
    w = torch.tensor([1.0, 3.0])
    x = torch.tensor([[1.0, 2.0], [0.5, -1.0]], requires_grad=True)
    logits = (w * x.square()).sum(1)
    want = (4 * (1 + 9 * 4) + 4 * (0.25 + 9 * 1)) / 2
    assert r1_penalty(logits, x).item() == pytest.approx(want)


def test_r1_penalty_backpropagates_into_d_parameters():
    w = torch.tensor([1.0, 3.0], requires_grad=True)
    x = torch.tensor([[1.0, 2.0]], requires_grad=True)
    r1_penalty((w * x.square()).sum(1), x).backward()
    # penalty = 4 (w0^2 x0^2 + w1^2 x1^2) -> d/dw = 8 w x^2
    assert torch.allclose(w.grad, torch.tensor([8.0 * 1 * 1, 8.0 * 3 * 4]))


def test_gradient_penalty_matches_hand_value():
    # D(x) = sum(a * x) -> grad = a everywhere; |a| = 5 -> (5 - 1)^2 = 16.
    a = torch.tensor([3.0, 4.0])
    x = torch.randn(3, 2, requires_grad=True)
    assert gradient_penalty((a * x).sum(1), x).item() == pytest.approx(16.0)


def test_interpolates_lie_between_real_and_fake():
    real, fake = torch.zeros(64, 3), torch.ones(64, 3)
    mixed = interpolate(real, fake, torch.Generator().manual_seed(0))
    assert mixed.requires_grad and (mixed >= 0).all() and (mixed <= 1).all()
    assert torch.allclose(mixed[:, 0], mixed[:, 1])  # one alpha per sample
    assert mixed[:, 0].std() > 0.1


def test_code_loss_matches_hand_value():
    # Codes 1 and 0; the head's logits give them probabilities e^2 / (e^2 + 2) and 1 / 3.
    code_logits = torch.tensor([[0.0, 2.0, 0.0], [1.0, 1.0, 1.0]])
    hand = (-math.log(math.exp(2) / (math.exp(2) + 2)) + math.log(3)) / 2
    assert code_loss(code_logits, torch.tensor([1, 0])).item() == pytest.approx(hand, rel=1e-6)
