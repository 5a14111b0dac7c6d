"""G_ema decay from image counts, buffer copies; statistics reduction; the ranks' weight fingerprint."""

import pytest
import torch

from gan_dist.ema import EMA, ema_decay
from gan_dist.stats import Stats


def test_decay_halves_weight_every_half_life():
    # 1000 images per step, half-life 10 kimg: after 10 steps the old weights count half.
    decay = ema_decay(num_images=10**9, batch_size=1000, half_life_kimg=10, rampup=0)
    assert decay**10 == pytest.approx(0.5)


def test_decay_is_batch_size_invariant():
    small = ema_decay(10**9, 100, 10, 0) ** 100
    large = ema_decay(10**9, 10_000, 10, 0)
    assert small == pytest.approx(large)


def test_rampup_shortens_the_half_life_early():
    early = ema_decay(num_images=2_000, batch_size=100, half_life_kimg=10, rampup=0.05)
    late = ema_decay(num_images=10**7, batch_size=100, half_life_kimg=10, rampup=0.05)
    assert early == pytest.approx(0.5 ** (100 / 100))  # half-life capped at 5% of 2,000 images
    assert late == pytest.approx(0.5 ** (100 / 10_000))


def test_ema_follows_the_formula_and_copies_buffers():
    G = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    ema = EMA(G, half_life_kimg=0.1, rampup=0)
    ema.update(G, num_images=100, batch_size=100)  # first update copies
    start = ema.module[0].weight.clone()
    with torch.no_grad():
        G[0].weight.add_(1.0)
        G[1].running_mean.fill_(7.0)
    ema.update(G, num_images=200, batch_size=100)
    decay = 0.5  # 100 images at a half-life of 100 images
    assert torch.allclose(ema.module[0].weight, decay * start + (1 - decay) * G[0].weight)
    assert torch.equal(ema.module[1].running_mean, G[1].running_mean)
    assert not ema.module[0].weight.requires_grad and not ema.module.training


def test_stats_mean_over_interval_and_reset():
    class OneProcess:
        num_processes = 1

    stats = Stats()
    for value in (1.0, 2.0, 6.0):
        stats.report("Loss/D", torch.tensor(value))
    stats.report("Loss/G", torch.tensor([4.0]))
    assert stats.reduce(OneProcess()) == {"Loss/D": 3.0, "Loss/G": 4.0}
    assert stats.reduce(OneProcess()) == {}


def test_lr_factor_warms_up_and_ramps_down():
    from gan_dist.phases import lr_factor

    # 100 images per step, 1 kimg warm-up, 2 kimg ramp-down at the end of 10 kimg.
    assert lr_factor(0, 10_000, 100, 1.0, 2.0) == pytest.approx(0.1)
    assert lr_factor(900, 10_000, 100, 1.0, 2.0) == pytest.approx(1.0)
    assert lr_factor(5_000, 10_000, 100, 1.0, 2.0) == pytest.approx(1.0)
    assert lr_factor(9_000, 10_000, 100, 1.0, 2.0) == pytest.approx(0.5)
    assert lr_factor(10_000, 10_000, 100, 1.0, 2.0) == 0.0
    assert lr_factor(123, 10_000, 100, 0.0, 0.0) == 1.0


def test_rank_fingerprint_reads_half_precision_views_at_odd_offsets():
    from gan_dist.parallel.ranks import _fingerprint

    flat = torch.randn(9).to(torch.bfloat16)  # DeepSpeed keeps half-precision parameters as views of one buffer
    view = flat[1:5]
    assert view.storage_offset() * view.element_size() % 4 == 2
    assert torch.equal(_fingerprint(view), _fingerprint(view.clone()))
    changed = view.clone()
    changed[2] = changed[2] + 1
    assert not torch.equal(_fingerprint(view), _fingerprint(changed))
