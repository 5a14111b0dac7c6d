"""The 2-D Gaussian mixtures of the PacGAN protocol (ring of 8, grid of 25).

The mode layouts and standard deviations are the published ones, so that mode-coverage
results can be compared with PacGAN's Table 1.
"""

from __future__ import annotations

import numpy as np

RING8_STD = 0.01
GRID25_STD = 0.05
NUM_POINTS = 100_000


def ring8_modes() -> np.ndarray:
    angles = 2 * np.pi * np.arange(8) / 8
    return np.stack([np.cos(angles), np.sin(angles)], axis=1)


def grid25_modes() -> np.ndarray:
    axis = np.array([-4.0, -2.0, 0.0, 2.0, 4.0])
    return np.array([(i, j) for i in axis for j in axis])


MIXTURES = {"ring8": (ring8_modes, RING8_STD), "grid25": (grid25_modes, GRID25_STD)}


def sample_mixture(name: str, num_points: int = NUM_POINTS, seed: int = 0):
    """(points float32 [N, 2], mode index int64 [N]) drawn uniformly over the modes."""
    modes_fn, std = MIXTURES[name]
    modes = modes_fn()
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(modes), size=num_points)
    points = modes[labels] + rng.normal(0.0, std, size=(num_points, 2))
    return points.astype(np.float32), labels.astype(np.int64)
