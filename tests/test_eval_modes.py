"""modes2d: the PacGAN mode-coverage protocol on ring8 and grid25."""

import numpy as np
import pytest

from gan_dist.data.toy import MIXTURES, sample_mixture
from gan_dist.eval.modes2d import NUM_SAMPLES, mode_coverage


@pytest.mark.parametrize("mixture", ["ring8", "grid25"])
def test_the_true_mixture_covers_every_mode_evenly(mixture):
    points, _ = sample_mixture(mixture, NUM_SAMPLES, seed=3)
    result = mode_coverage(points, mixture)
    assert result["modes"] == result["num_modes"] == len(MIXTURES[mixture][0]())
    assert result["hq_fraction"] > 0.97  # 3 std in 2-D holds 98.9% of a Gaussian
    assert result["reverse_kl"] < 0.01


@pytest.mark.parametrize("mixture", ["ring8", "grid25"])
def test_a_collapsed_generator_is_one_mode(mixture):
    modes_fn, std = MIXTURES[mixture]
    rng = np.random.default_rng(0)
    points = modes_fn()[2] + rng.normal(0, std, size=(NUM_SAMPLES, 2))
    result = mode_coverage(points, mixture)
    assert result["modes"] == 1
    assert result["reverse_kl"] == pytest.approx(np.log(result["num_modes"]), rel=1e-6)


def test_points_off_the_modes_are_low_quality_and_uneven_shares_raise_kl():
    modes_fn, _std = MIXTURES["ring8"]
    modes = modes_fn()
    between = (modes[0] + modes[1]) / 2  # far from both
    two_modes = np.concatenate([np.repeat(modes[:1], 300, 0), np.repeat(modes[1:2], 100, 0)])
    result = mode_coverage(np.concatenate([two_modes, np.repeat(between[None], 100, 0)]), "ring8")
    assert result["modes"] == 2
    assert result["hq_fraction"] == pytest.approx(0.8)
    share = np.array([0.75, 0.25])
    assert result["reverse_kl"] == pytest.approx(float(np.sum(share * np.log(share * 8))))
    assert mode_coverage(np.repeat(between[None], 10, 0), "ring8")["modes"] == 0
