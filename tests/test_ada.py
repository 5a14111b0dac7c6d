"""Adaptive discriminator augmentation: the bgc operations, the fallback sampler against
grid_sample (values and gradients of gradients), R1 through the augmentation, the controller
of p and its invariance to a constant added to D, and its config errors."""

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_args
from torch import nn

from gan_dist import ada
from gan_dist.augment import AdaptiveP
from gan_dist.augment_names import parse_pipeline
from gan_dist.losses import get_loss
from gan_dist.models import MODELS, register_model


def _images(n=6, channels=3, height=8, width=16, seed=0):
    return torch.rand(n, channels, height, width, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _grid(n, height, width, seed=1, dtype=torch.float64):
    """Sampling points inside and well outside the image (reflection), none on a pixel edge."""
    return torch.rand(n, height, width, 2, generator=torch.Generator().manual_seed(seed), dtype=dtype) * 4 - 2


def test_the_fallback_sampler_equals_grid_sample_in_values_gradients_and_gradients_of_gradients():
    x = torch.randn(2, 3, 7, 9, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(2, 3, 5, 6, dtype=torch.float64, requires_grad=True)  # stands in for D's weights
    grid = _grid(2, 5, 6)
    results = []
    for sampler in (ada.native_sample, ada.gather_sample):
        out = sampler(x, grid)
        (grad_x,) = torch.autograd.grad((out * weight).sin().sum(), x, create_graph=True)
        (grad_weight,) = torch.autograd.grad(grad_x.square().sum(), weight)  # R1's double backward
        results.append((out.detach(), grad_x.detach(), grad_weight))
    for native, fallback, what in zip(*results, ("values", "gradients", "gradients of gradients")):
        assert torch.allclose(native, fallback, atol=1e-12), what
    assert torch.autograd.gradgradcheck(lambda t: ada.gather_sample(t, grid).sin(), (x,))


def test_the_probe_picks_the_fallback_where_grid_sample_has_no_double_backward(monkeypatch):
    class OnceDifferentiable(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, grid):
            ctx.save_for_backward(x, grid)
            return F.grid_sample(x, grid, padding_mode="reflection", align_corners=False)

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx, grad):
            x, grid = ctx.saved_tensors
            with torch.enable_grad():
                x = x.detach().requires_grad_(True)
                out = F.grid_sample(x, grid, padding_mode="reflection", align_corners=False)
                return torch.autograd.grad(out, x, grad)[0], None

    ada.native_double_backward_works.cache_clear()
    if torch.__version__ >= (2, 14):  # this machine's torch has the double backward; older ones may not
        assert ada.sampler_for(torch.device("cpu"), torch.float64) is ada.native_sample
    monkeypatch.setattr(ada, "native_sample", OnceDifferentiable.apply)
    ada.native_double_backward_works.cache_clear()
    try:
        assert ada.sampler_for(torch.device("cpu"), torch.float64) is ada.gather_sample
    finally:
        ada.native_double_backward_works.cache_clear()


def test_p_zero_passes_every_image_through_bit_for_bit_and_p_one_changes_every_image():
    x = _images()
    same, changed = ada.augment(x, parse_pipeline("bgc,cutout"), 0.0, torch.Generator().manual_seed(0))
    assert torch.equal(same, x) and not changed.any()
    out, changed = ada.augment(x, parse_pipeline("bgc,cutout"), torch.tensor(1.0), torch.Generator().manual_seed(0))
    assert changed.all() and (out != x).flatten(1).any(1).all()


def test_each_operation_chooses_about_p_of_the_images():
    x = _images(n=4000, channels=1, height=4, width=4)
    for op in ("xflip", "scale", "brightness", "cutout"):
        _, changed = ada.augment(x, (op,), 0.3, torch.Generator().manual_seed(2))
        assert 0.27 < changed.float().mean().item() < 0.33, op


def test_exact_operations_keep_pixels_non_square_images_included():
    x = _images(height=8, width=16)
    flipped, _ = ada.augment(x, ("xflip",), 1.0, torch.Generator().manual_seed(3))
    for image, out in zip(x, flipped):
        assert min((out - image).abs().max(), (out - image.flip(2)).abs().max()) < 1e-5
    square = _images(height=8, width=8)
    turned, _ = ada.augment(square, ("rotate90",), 1.0, torch.Generator().manual_seed(3))
    for image, out in zip(square, turned):
        assert min((out - torch.rot90(image, k, (1, 2))).abs().max() for k in range(4)) < 1e-5
    grey = _images(channels=1)
    inverted, _ = ada.augment(grey, ("lumaflip",), 1.0, torch.Generator().manual_seed(3))
    for image, out in zip(grey, inverted):
        assert min((out - image).abs().max(), (out + image).abs().max()) < 1e-6
    holes, _ = ada.augment(x, ("cutout",), 1.0, torch.Generator().manual_seed(3))
    # Half the height by half the width, centred anywhere in the image, so cut off at its edges.
    area = (holes == 0).all(1).flatten(1).float().mean(1)
    assert ((area > 0) & (area <= 0.25)).all() and (area == 0.25).any(), area


def test_a_rotation_of_a_non_square_image_does_not_shear():
    """A disc in a 16x32 image stays a disc (its second moments equal in every direction):
    distances are in pixels, not in [-1, 1] units, where a rotation would make an ellipse."""
    rows, cols = torch.meshgrid(torch.arange(16) + 0.5, torch.arange(32) + 0.5, indexing="ij")
    disc = (((rows - 8) ** 2 + (cols - 16) ** 2) < 25).float()[None, None].expand(8, 1, 16, 32) * 2 - 1
    out, _ = ada.augment(disc, ("rotate",), 1.0, torch.Generator().manual_seed(4))
    near = (((rows - 8) ** 2 + (cols - 16) ** 2) < 7.5**2).float()  # away from reflected copies
    for image in out:
        weight = (image[0] + 1) / 2 * near
        centred = torch.stack([rows - 8, cols - 16]).flatten(1)
        moments = (centred * weight.flatten()) @ centred.T / weight.sum()
        low, high = torch.linalg.eigvalsh(moments)
        assert high / low < 1.1, moments


def test_r1_through_the_augmentation_is_the_same_with_either_sampler(monkeypatch):
    D = nn.Sequential(nn.Conv2d(3, 4, 3), nn.LeakyReLU(0.2), nn.Flatten(), nn.LazyLinear(1)).double()
    x = _images(n=4, height=8, width=8).double()
    D(x)
    grads = []
    for fallback in (False, True):
        if fallback:
            monkeypatch.setattr(ada, "sampler_for", lambda *_: ada.gather_sample)
        real = x.clone().requires_grad_(True)
        augmented, _ = ada.augment(real, parse_pipeline("bgc"), 0.8, torch.Generator().manual_seed(5))
        (grad_x,) = torch.autograd.grad(D(augmented).sum(), real, create_graph=True)
        D.zero_grad()
        grad_x.square().flatten(1).sum(1).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in D.parameters() if p.grad is not None]))
    assert grads[0].abs().max() > 0 and torch.allclose(grads[0], grads[1], atol=1e-10)


def test_p_moves_by_its_rate_toward_the_target_and_stays_in_0_1():
    logits, paired, squares = (get_loss(name) for name in ("nonsaturating", "relativistic", "least_squares"))
    control = AdaptiveP(0.05, target=0.6, p_step_per_adjustment=0.02, loss=logits, device=torch.device("cpu"))
    for sign, expected in ((1.0, 0.07), (1.0, 0.09), (-1.0, 0.07), (-1.0, 0.05), (-1.0, 0.03), (-1.0, 0.01),
                           (-1.0, 0.0)):
        control.observe(torch.full((8,), sign), torch.zeros(8))
        control.adjust(lambda totals: totals)
        assert abs(control.p.item() - expected) < 1e-6 and control.signal.item() == sign
    relative = AdaptiveP(0.5, target=0.6, p_step_per_adjustment=0.1, loss=paired, device=torch.device("cpu"))
    relative.observe(torch.full((8,), -3.0), torch.full((8,), -5.0))  # D(real) < 0, yet above D(fake)
    relative.adjust(lambda totals: totals)
    assert relative.signal.item() == 1.0 and abs(relative.p.item() - 0.6) < 1e-6
    # Least squares trains D(real) toward 1 and D(fake) toward 0: 0.3 is on the fake side.
    lsgan = AdaptiveP(0.5, target=0.6, p_step_per_adjustment=0.1, loss=squares, device=torch.device("cpu"))
    lsgan.observe(torch.full((8,), 0.3), torch.zeros(8))
    lsgan.adjust(lambda totals: totals)
    assert lsgan.signal.item() == -1.0 and abs(lsgan.p.item() - 0.4) < 1e-6


def test_adapted_p_starts_at_0_unless_set():
    from gan_dist.config import load_config
    from gan_dist.schedules import augment_p_start

    assert augment_p_start(load_config(None, ["data.augment=bgc", "data.ada_kimg=10"]).data) == 0.0
    assert augment_p_start(load_config(None, ["data.augment=bgc"]).data) == 1.0
    assert augment_p_start(load_config(None, ["data.augment=bgc", "data.ada_kimg=10", "data.augment_p=0.3"]).data) == 0.3


class Shifted(nn.Module):
    """D plus a constant."""

    def __init__(self, D: nn.Module, constant: float):
        super().__init__()
        self.D, self.constant = D, constant

    def forward(self, x, labels=None, with_code=False):
        return self.D(x, labels) + self.constant


@pytest.fixture
def shifted_model():
    @register_model("test_shifted_mlp")
    def build(cfg, shape, num_classes):
        G, D = MODELS["mlp"](cfg, shape, num_classes)
        return G, Shifted(D, 4.0)

    yield
    MODELS.pop("test_shifted_mlp")


@pytest.mark.parametrize("loss, invariant", [("relativistic", True), ("nonsaturating", False)])
def test_a_constant_added_to_d_leaves_ps_trajectory_unchanged_for_a_shift_invariant_loss(
        train_main, digits_dir, tmp_path, shifted_model, loss, invariant):
    """Relativistic + R1 + R2 reads E[sign(D(real) - D(fake))]: the same p with D + 4. The
    non-saturating loss reads E[sign(D(real))], which the constant moves (the control)."""
    flags = ("data.augment=bgc", "data.augment_p=0.2", "data.ada_kimg=1.28", f"loss.name={loss}", "loss.r1_gamma=1",
             f"loss.r2={invariant}", "log.every_steps=2", "train.max_steps=16", "train.mixed_precision=no")
    trajectories = []
    for name, model in (("plain", "mlp"), ("shifted", "test_shifted_mlp")):
        assert train_main(*tiny_args(digits_dir, *flags, f"run.name={name}", f"model.name={model}"))[0] == 0
        rows = [json.loads(line) for line in (tmp_path / "runs" / name / "metrics.jsonl").read_text().splitlines()]
        trajectories.append([row["Augment/p"] for row in rows if "Augment/p" in row])
    assert len(trajectories[0]) == 8 and len(set(trajectories[0])) >= 2, trajectories[0]  # p moved
    assert (trajectories[0] == trajectories[1]) is invariant, trajectories


@pytest.mark.parametrize("flags, message", [
    (["data.augment=bgc,spin"], "unknown augmentation 'spin'"),
    (["data.augment=bgc", "data.diffaugment=color"], "one augmentation before D"),
    (["data.ada_kimg=100"], "needs data.augment"),
    (["data.augment=bgc", "data.ada_target=0.5"], "applies only when p is adapted"),
    (["data.augment=bgc", "data.ada_kimg=100", "data.augment_p_schedule.end=0.5", "data.augment_p_schedule.kimg=10"],
     "either adapted or scheduled"),
])
def test_bad_ada_configs_exit_2_naming_the_key(train_main, digits_dir, flags, message):
    code, _, err = train_main(*tiny_args(digits_dir, *flags))
    assert code == 2 and message in err, err
