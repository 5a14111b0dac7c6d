"""The modern recipe's pieces: the relativistic game with R1 + R2, R2 at the fakes D saw,
cosine schedules, and the r3gan backbone."""

import math
from types import SimpleNamespace

import pytest
import torch

from gan_dist.config import load_config
from gan_dist.errors import UserError
from gan_dist.losses import get_loss, r1_penalty, r2_penalty
from gan_dist.phases import Phases
from gan_dist.schedules import Schedule, cosine, values_at


def _dirac_game(gamma: float, steps: int = 3000, lr: float = 0.05) -> tuple[float, float]:
    """The Dirac-GAN (Mescheder et al. 2018): real data at 0, G a point theta, D(x) = psi * x,
    trained by alternating gradient steps on our relativistic loss and penalties."""
    loss = get_loss("relativistic")
    theta = torch.tensor([1.0], requires_grad=True)
    psi = torch.tensor([0.0], requires_grad=True)
    for _ in range(steps):
        real = torch.zeros(1, 1, requires_grad=True)
        fake = theta.detach().reshape(1, 1).requires_grad_(True)
        real_logits, fake_logits = (psi * real).flatten(), (psi * fake).flatten()
        d_loss = loss.d_loss(real_logits, fake_logits)
        if gamma:
            d_loss = d_loss + gamma / 2 * (r1_penalty(real_logits, real) + r2_penalty(fake_logits, fake))
        (grad,) = torch.autograd.grad(d_loss, psi)
        with torch.no_grad():
            psi -= lr * grad
        g_loss = loss.g_loss((psi.detach() * theta).flatten(), (psi.detach() * torch.zeros(1)).flatten())
        (grad,) = torch.autograd.grad(g_loss, theta)
        with torch.no_grad():
            theta -= lr * grad
    return theta.item(), psi.item()


def test_the_relativistic_dirac_game_converges_with_r1_and_r2_only():
    """With R1 + R2 the distance to the equilibrium shrinks geometrically; without them the
    relativistic game only drifts inward like 1/sqrt(steps) (its energy loss is of fourth
    order near the equilibrium), still over 0.2 away after 2,000 steps."""
    regularised = [math.hypot(*_dirac_game(1.0, steps)) for steps in (1000, 2000)]
    assert regularised[0] < 2e-3 and regularised[1] < 1e-5
    plain = [math.hypot(*_dirac_game(0.0, steps)) for steps in (1000, 2000)]
    assert plain[1] > 0.2 and plain[1] / plain[0] > 0.7


class _Stub(Phases):
    """What Phases._d_loss reads from a Trainer, for one penalised D step."""

    def __init__(self, G, D, gamma: float, r2: bool):
        from gan_dist.stats import Stats

        self.G, self.D, self.D_eager = G, D, D
        self.cfg = SimpleNamespace(loss=SimpleNamespace(r2=r2, r1_interval=1, gp_weight=0.0),
                                   model=SimpleNamespace(num_latent_categories=0))
        self.loss, self.values = get_loss("relativistic"), SimpleNamespace(gamma=gamma)
        self.augment, self.ada = SimpleNamespace(before_d=lambda x: x), None
        self.backend = SimpleNamespace(scaler=lambda name: None)
        self.stats = Stats()
        self.reported = {}
        report = self.stats.report
        self.stats.report = lambda name, value: self.reported.__setitem__(name, float(value.detach())) or report(name, value)

    def _noise(self, count):
        return torch.zeros(count, 1), None


def test_r2_is_taken_at_the_fakes_d_saw_and_reaches_d_alone():
    """1-D, D(x) = w * x^3 (non-linear: R1 != R2), reals at 1, G's fakes at theta = 2."""
    class G(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.theta = torch.nn.Parameter(torch.tensor(2.0))

        def forward(self, z, labels=None):
            return self.theta * torch.ones_like(z)

    class D(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor(0.5))

        def forward(self, x, labels=None):
            return (self.w * x**3).flatten()

    g, d, gamma = G(), D(), 0.4
    stub = _Stub(g, d, gamma, r2=True)
    loss = stub._d_loss(torch.ones(3, 1), None, regularise=True)
    w, real, fake = 0.5, 1.0, 2.0
    r1, r2 = (3 * w * real**2) ** 2, (3 * w * fake**2) ** 2  # |dD/dx|^2: 2.25 and 36
    assert stub.reported["Loss/D/r1"] == pytest.approx(r1) and stub.reported["Loss/D/r2"] == pytest.approx(r2)
    adversarial = math.log1p(math.exp(w * fake**3 - w * real**3))
    assert loss.item() == pytest.approx(adversarial + gamma / 2 * (r1 + r2))
    loss.backward()
    assert g.theta.grad is None, "R2 must not reach G: its fakes are detached"
    sigmoid = 1 / (1 + math.exp(-(w * fake**3 - w * real**3)))
    want = sigmoid * (fake**3 - real**3) + gamma / 2 * (2 * 9 * w * real**4 + 2 * 9 * w * fake**4)
    assert d.w.grad.item() == pytest.approx(want)
    without = _Stub(G(), D(), gamma, r2=False)
    without._d_loss(torch.ones(3, 1), None, regularise=True)
    assert "Loss/D/r2" not in without.reported


def test_a_cosine_schedule_runs_over_its_own_horizon_then_holds():
    schedule = Schedule(end=1.0, kimg=10)
    assert cosine(3.0, schedule, 0) == 3.0 and cosine(3.0, schedule, 5_000) == pytest.approx(2.0)
    assert cosine(3.0, schedule, 10_000) == pytest.approx(1.0) and cosine(3.0, schedule, 99_000) == 1.0
    assert cosine(3.0, Schedule(), 5_000) == 3.0
    moving = ["optim.generator.lr_schedule.end=5e-5", "optim.generator.lr_schedule.kimg=100",
              "train.ema_half_life_kimg=0", "train.ema_half_life_schedule.end=50",
              "train.ema_half_life_schedule.kimg=100"]
    short, long = (load_config(None, [*moving, f"train.total_kimg={k}"]) for k in (200, 5000))
    for images in (0, 30_000, 100_000, 400_000):
        assert values_at(short, images) == values_at(long, images)
    assert values_at(short, 100_000).lr["G"] == pytest.approx(5e-5) and values_at(short, 0).ema_half_life_kimg == 0


@pytest.mark.parametrize("overrides, message", [
    (["optim.generator.lr_schedule.end=1e-5"], "optim.generator.lr_schedule.kimg' must be > 0"),
    (["loss.gamma_schedule.kimg=10"], "needs loss.gamma_schedule.end"),
    (["optim.discriminator.beta2_schedule.end=1.5", "optim.discriminator.beta2_schedule.kimg=1"], "must be in"),
    (["optim.generator.rampdown_kimg=5", "optim.generator.lr_schedule.end=1e-5", "optim.generator.lr_schedule.kimg=1"],
     "both shape the end of the learning rate"),
    (["data.augment_p=1.5"], "data.augment_p' must be in"),
])
def test_schedule_errors_name_the_key(overrides, message):
    with pytest.raises(UserError, match=message):
        load_config(None, overrides)


def test_r3gan_widths_and_blocks_start_as_the_identity():
    from gan_dist.config import ModelConfig
    from gan_dist.models import build_models, count_parameters
    from gan_dist.models.r3gan import Block, stage_channels

    assert stage_channels(32, 1.0) == [768] * 4 and stage_channels(128, 1.0)[-2:] == [384, 192]
    G, D = build_models(ModelConfig(name="r3gan", g_norm="none", latent_dim=64), (3, 32, 32), 0)
    assert 19e6 < count_parameters(G) < 23e6 and 19e6 < count_parameters(D) < 23e6  # the paper's CIFAR preset: ~21M
    block = Block(16, 8)
    x = torch.randn(2, 16, 8, 8)
    assert torch.equal(block(x), x)
    small = ModelConfig(name="r3gan", g_norm="none", latent_dim=8, width_mult=1 / 24, conditional=True)
    G, D = build_models(small, (1, 16, 16), 10)
    images = G(torch.randn(4, 8), torch.arange(4))
    assert images.shape == (4, 1, 16, 16) and D(images, torch.arange(4)).shape == (4,)
    with pytest.raises(UserError, match="whose shorter side is 16, 32, 64, 128, 256 px"):
        build_models(small, (1, 28, 28), 10)
