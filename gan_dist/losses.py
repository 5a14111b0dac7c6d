"""Adversarial losses and gradient regularisers, as pure functions of D's logits.

Everything takes raw logits: a Sigmoid followed by BCELoss overflows under autocast, while
softplus on logits is exact and stable. Each loss returns the batch mean.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gan_dist.errors import UserError, did_you_mean


@dataclass(frozen=True)
class AdversarialLoss:
    d_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    """(real_logits, fake_logits) -> D's loss."""
    g_loss: Callable[[torch.Tensor], torch.Tensor] | Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    """fake_logits -> G's loss; (fake_logits, real_logits) -> G's loss when `g_reads_real`."""
    g_reads_real: bool = False
    """G's loss compares fakes with reals: the G phase reads a real batch and D's logits for it."""
    shift_invariant: bool = False
    """Adding a constant to D changes neither loss, so D(real) alone means nothing (ADA's signal)."""
    undecided_logit: float = 0.0
    """The logit halfway between D's targets for fakes and reals: ADA reads sign(D(real) - this)."""


def _d_cross_entropy(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    # -log sigmoid(r) - log(1 - sigmoid(f)) == softplus(-r) + softplus(f)
    return F.softplus(-real).mean() + F.softplus(fake).mean()


LOSSES: dict[str, AdversarialLoss] = {
    # G maximises log D(G(z)): strong gradients early (Goodfellow et al., the usual default).
    "nonsaturating": AdversarialLoss(_d_cross_entropy, lambda fake: F.softplus(-fake).mean()),
    # G minimises log(1 - D(G(z))) = -softplus(f): the tutorial's original objective.
    "minimax": AdversarialLoss(_d_cross_entropy, lambda fake: -F.softplus(fake).mean()),
    "hinge": AdversarialLoss(
        lambda real, fake: F.relu(1 - real).mean() + F.relu(1 + fake).mean(),
        lambda fake: -fake.mean()),
    "wasserstein": AdversarialLoss(
        lambda real, fake: fake.mean() - real.mean(),
        lambda fake: -fake.mean(), shift_invariant=True),
    # LSGAN with targets a=0 (fake), b=1 (real), c=1 (what G wants D to say).
    "least_squares": AdversarialLoss(
        lambda real, fake: 0.5 * (real - 1).square().mean() + 0.5 * fake.square().mean(),
        lambda fake: 0.5 * (fake - 1).square().mean(), undecided_logit=0.5),
    # Relativistic pairing (Jolicoeur-Martineau 2019; R3GAN): D says how much more real a real
    # image is than a fake one, pair by pair, so the loss moves no logit on its own; with R1 and
    # R2 it has one equilibrium that gradient descent reaches (R3GAN's proof, our Dirac test).
    "relativistic": AdversarialLoss(
        lambda real, fake: F.softplus(fake - real).mean(),
        lambda fake, real: F.softplus(real - fake).mean(),
        g_reads_real=True, shift_invariant=True),
}


def get_loss(name: str) -> AdversarialLoss:
    if name not in LOSSES:
        raise UserError(f"config key 'loss.name': unknown loss '{name}'{did_you_mean(name, LOSSES)}")
    return LOSSES[name]


def input_gradients(outputs: torch.Tensor, inputs: torch.Tensor, scaler=None) -> torch.Tensor:
    """d(sum outputs)/d(inputs), kept in the graph so a penalty on it can be backpropagated.

    Under fp16 the inner gradient is taken of the sum times the square root of the loss
    scale, then unscaled. Two backward passes run in half precision here: this inner one, and
    the double backward through it when D's loss is backpropagated (scaled by the full loss
    scale, but met by the penalty's 1/scale on the way in). PyTorch's AMP recipe scales the
    inner pass by the full loss scale, which leaves the double backward unscaled: D's gradient
    from R1 then underflowed to zero in tests/test_precision.py, and an unscaled inner pass
    lost the penalty itself. The square root (rounded down to a power of two, so that the
    scaling itself is exact) gives each pass half of the scale's exponent range. The scale stays a device tensor: `get_scale()` would stop the host every step.
    """
    total = outputs.sum()
    if scaler is not None:
        full = scaler.scale(torch.ones((), device=total.device, dtype=torch.float32))
        scale = torch.exp2(torch.floor(torch.log2(full) / 2))  # a power of two, exact in fp16
        (grad,) = torch.autograd.grad(total * scale, inputs, create_graph=True)
        return grad / scale
    (grad,) = torch.autograd.grad(total, inputs, create_graph=True)
    return grad


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """Half-precision outputs are promoted for the loss; float64 (the equivalence tests) is kept."""
    return t if t.dtype == torch.float64 else t.float()


def r1_penalty(real_logits: torch.Tensor, real: torch.Tensor, scaler=None) -> torch.Tensor:
    """Mean over samples of |grad_x D(x)|^2 at real x (Mescheder et al. 2018); weight gamma/2 outside.
    R2 is the same at the fakes D saw (`fake` detached from G, requiring grad)."""
    grad = input_gradients(real_logits, real, scaler)
    return at_least_fp32(grad).square().flatten(1).sum(1).mean()


r2_penalty = r1_penalty


def interpolate(real: torch.Tensor, fake: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random points on the lines between real and fake samples (WGAN-GP), requiring grad."""
    shape = (real.shape[0],) + (1,) * (real.dim() - 1)
    alpha = torch.rand(shape, device=real.device, generator=generator, dtype=real.dtype)
    return (alpha * real.detach() + (1 - alpha) * fake.detach()).requires_grad_(True)


def gradient_penalty(mixed_logits: torch.Tensor, mixed: torch.Tensor, scaler=None) -> torch.Tensor:
    """Mean of (|grad_x D(x)| - 1)^2 at interpolates x (Gulrajani et al. 2017); weight outside."""
    grad = input_gradients(mixed_logits, mixed, scaler)
    return (at_least_fp32(grad).flatten(1).norm(dim=1) - 1).square().mean()


def code_loss(code_logits: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """InfoGAN's categorical term: cross-entropy of D's code head against the code each fake
    was drawn with. Minimising it over G and the head maximises a lower bound on the mutual
    information between code and image, so G must make the categories look different."""
    return F.cross_entropy(code_logits.float(), codes)
