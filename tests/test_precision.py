"""fp16 on a CPU (torch runs float16 autocast and GradScaler("cpu") there; the DDP backend owns
both): the penalties under the scaler, overflows per network, and the layers that DeepSpeed's
half-precision engines run in fp32."""

import copy
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import tiny_args

from gan_dist import parallel
from gan_dist.config import ModelConfig
from gan_dist.losses import at_least_fp32, gradient_penalty, interpolate, r1_penalty
from gan_dist.models import build_models
from gan_dist.parallel.ddp import DDPBackend

SHAPE = (1, 16, 16)
R1_WEIGHT, GP_WEIGHT = 80.0, 10.0  # R1: gamma 10 / 2 x lazy interval 16, as the configs use it


def _backend(G, D, precision: str) -> DDPBackend:
    accelerator = parallel.build_accelerator("no", Path(tempfile.mkdtemp()), tensorboard=False, device="cpu")
    G, D = copy.deepcopy(G), copy.deepcopy(D)
    return DDPBackend(accelerator, G, D, torch.optim.Adam(G.parameters(), fused=True),
                      torch.optim.Adam(D.parameters(), fused=True), precision=precision)


def _small_gradient_dcgan():
    """A DCGAN D whose input gradients are tiny (its last conv scaled by 3e-5): about 1e-9 per
    pixel, far below float16's smallest normal number (6e-5)."""
    torch.manual_seed(0)
    G, D = build_models(ModelConfig(name="dcgan", width_mult=0.125, latent_dim=16, g_norm="none"), SHAPE, 0)
    last = [m for m in D.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    with torch.no_grad():
        last.weight.mul_(3e-5)
    return G, D


def _penalty_step(backend, which: str, scaler, real, fake) -> tuple[float, float]:
    """(penalty, norm of D's gradient from it) at the first step the fp16 scaler does not skip:
    skipped steps leave D as it was, so every backend is measured at the same weights."""
    for _ in range(30):
        backend.zero_grad("D")
        if which == "r1":
            x = real.clone().requires_grad_(True)
            penalty = r1_penalty(at_least_fp32(backend.eager["D"](x)), x, scaler(backend))
            weight = R1_WEIGHT
        else:
            x = interpolate(real, fake, torch.Generator().manual_seed(1))
            penalty = gradient_penalty(at_least_fp32(backend.eager["D"](x)), x, scaler(backend))
            weight = GP_WEIGHT
        backend.backward("D", penalty * weight)
        norm, _, overflow = backend.step("D", 0.0, None)
        if not bool(overflow):
            return float(penalty.detach()), float(norm)
    raise AssertionError("the fp16 scaler skipped every step")


@pytest.mark.parametrize("which", ["r1", "gp"])
def test_penalties_under_the_fp16_scaler_match_fp32_and_underflow_without_it(which):
    G, D = _small_gradient_dcgan()
    real, fake = torch.rand(16, *SHAPE) * 2 - 1, torch.rand(16, *SHAPE) * 2 - 1
    fp32 = _penalty_step(_backend(G, D, "no"), which, lambda b: None, real, fake)
    fp16 = _penalty_step(_backend(G, D, "fp16"), which, lambda b: b.scaler("D"), real, fake)
    assert fp32[1] > 0
    for got, want in zip(fp16, fp32):
        assert got == pytest.approx(want, rel=1e-2), (fp16, fp32)
    # The negative control: the inner gradient taken without the scaler (D's loss still scaled)
    # underflows in float16, and D's gradient from the penalty vanishes with it.
    unscaled = _penalty_step(_backend(G, D, "fp16"), which, lambda b: None, real, fake)
    assert unscaled[1] < 0.1 * fp32[1], (unscaled, fp32)
    if which == "r1":
        assert unscaled[0] < 0.1 * fp32[0], (unscaled, fp32)


def test_pytorchs_full_scale_recipe_loses_the_r1_gradient():
    """Why input_gradients scales the inner pass by the square root of the loss scale: with
    the full scale (PyTorch's AMP recipe) the double backward runs unscaled and underflows."""
    from gan_dist import losses

    def full_scale(outputs, inputs, scaler=None):
        scale = scaler.scale(torch.ones(()))
        (grad,) = torch.autograd.grad(outputs.sum() * scale, inputs, create_graph=True)
        return grad / scale

    G, D = _small_gradient_dcgan()
    real = torch.rand(16, *SHAPE) * 2 - 1
    fp32 = _penalty_step(_backend(G, D, "no"), "r1", lambda b: None, real, None)
    original, losses.input_gradients = losses.input_gradients, full_scale
    try:
        recipe = _penalty_step(_backend(G, D, "fp16"), "r1", lambda b: b.scaler("D"), real, None)
    finally:
        losses.input_gradients = original
    assert recipe[0] == pytest.approx(fp32[0], rel=1e-2)  # the value is right...
    assert recipe[1] < 0.1 * fp32[1]  # ...but D's gradient from it is gone


def test_an_fp16_overflow_skips_its_own_network_only():
    """One scaler per network: D's overflow leaves D's weights, Adam moments and step count as
    they were, halves D's scale only, and G's next step is made."""
    torch.manual_seed(0)
    G, D = build_models(ModelConfig(name="mlp", width_mult=0.125, latent_dim=16, g_norm="none"), (1, 8, 8), 0)
    backend = _backend(G, D, "fp16")
    real, z = torch.rand(8, 1, 8, 8) * 2 - 1, torch.randn(8, 16)

    def d_step(factor: float):
        backend.zero_grad("D")
        backend.backward("D", at_least_fp32(backend.forward["D"](real)).mean() * factor)
        return backend.step("D", 0.0, None)

    def g_step():
        backend.zero_grad("G")
        with parallel.frozen(backend.params["D"]):
            backend.backward("G", -at_least_fp32(backend.forward["D"](backend.forward["G"](z))).mean())
        return backend.step("G", 0.0, None)

    for step in (lambda: d_step(1.0), g_step):  # the scalers calibrate; then Adam state exists
        assert any(not bool(step()[2]) for _ in range(20))
    d_weights = [p.detach().clone() for p in backend.params["D"]]
    d_state = copy.deepcopy(backend.optimizers["D"].state_dict()["state"])
    scales = {name: backend.loss_scale(name) for name in ("G", "D")}
    _, skipped, overflow = d_step(float("inf"))
    assert bool(overflow) and not skipped
    assert all(torch.equal(a, b) for a, b in zip(d_weights, backend.params["D"]))
    for index, state in backend.optimizers["D"].state_dict()["state"].items():
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(state[key], d_state[index][key]), key
    assert backend.loss_scale("D") == scales["D"] / 2 and backend.loss_scale("G") == scales["G"]
    g_before = [p.detach().clone() for p in backend.params["G"]]
    assert not bool(g_step()[2])
    assert not all(torch.equal(a, b) for a, b in zip(g_before, backend.params["G"]))


def test_fp16_training_counts_overflows_per_network(train_main, digits_dir, tmp_path, monkeypatch):
    """A NaN real batch at the 3rd D step: one more D overflow than the same run without it
    (the scalers' own calibration overflows are the same in both), none more for G, and no
    divergence skip."""
    import json

    from gan_dist import trainer as trainer_mod

    next_real, poison_at = trainer_mod.Trainer._next_real, {"call": 0, "at": 0}

    def poisoned(self, batches):
        x, y = next_real(self, batches)
        poison_at["call"] += 1
        return (x * float("nan"), y) if poison_at["call"] == poison_at["at"] else (x, y)

    monkeypatch.setattr(trainer_mod.Trainer, "_next_real", poisoned)
    last = {}
    for name, at in (("clean", 0), ("poisoned", 3)):
        poison_at.update(call=0, at=at)
        code, _, err = train_main(*tiny_args(digits_dir, "train.mixed_precision=fp16", "loss.r1_gamma=1",
                                             "loss.r1_interval=2", "train.max_steps=10", "log.every_steps=5",
                                             f"run.name={name}"))
        assert code == 0, err
        assert json.loads((tmp_path / "runs" / name / "run.json").read_text())["mixed_precision"] == "fp16"
        last[name] = json.loads((tmp_path / "runs" / name / "metrics.jsonl").read_text().splitlines()[-1])
    clean, poisoned_run = last["clean"], last["poisoned"]
    assert poisoned_run["Skipped/D_fp16_overflow"] == clean["Skipped/D_fp16_overflow"] + 1, (clean, poisoned_run)
    assert poisoned_run["Skipped/G_fp16_overflow"] == clean["Skipped/G_fp16_overflow"]
    assert poisoned_run["Skipped/D"] == poisoned_run["Skipped/G"] == 0
    assert all(torch.isfinite(torch.tensor(v)) for k, v in poisoned_run.items() if k.startswith("Loss/"))


def test_half_precision_engines_run_norm_layers_in_fp32():
    """zero.keep_statistics_in_fp32 on BatchNorm and spectral-norm layers whose parameters were
    cast to bf16 (as DeepSpeed's bf16 engines cast them): fp32 buffers, updated as an fp32
    layer updates them, outputs in bf16, gradients reaching the bf16 parameters, and the
    state_dict keys of the plain model."""
    from torch.nn.utils.parametrizations import spectral_norm

    from gan_dist.parallel.zero import keep_statistics_in_fp32

    torch.manual_seed(0)
    reference = torch.nn.Sequential(spectral_norm(torch.nn.Linear(6, 5)), torch.nn.BatchNorm1d(5))
    half = copy.deepcopy(reference)
    for p in half.parameters():
        p.data = p.data.to(torch.bfloat16)  # what DeepSpeed does: parameters only
    keys = list(half.state_dict())
    assert keep_statistics_in_fp32(half) == ["0.parametrizations.weight.0", "1"]
    x = torch.randn(8, 6)
    for _ in range(3):  # three power iterations and three running-statistics updates
        want, got = reference(x), half(x.to(torch.bfloat16))
    assert got.dtype == torch.bfloat16 and list(half.state_dict()) == keys
    torch.testing.assert_close(got.float(), want, atol=0.05, rtol=0.05)
    for name, buffer in half.named_buffers():
        if buffer.is_floating_point():
            assert buffer.dtype == torch.float32, name
            torch.testing.assert_close(buffer, dict(reference.named_buffers())[name], atol=5e-3, rtol=5e-3)
    got.float().square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in half.parameters())
