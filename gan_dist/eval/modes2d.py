"""Mode coverage on the 2-D Gaussian mixtures, by the PacGAN protocol.

A generated point is high quality (HQ) when its Euclidean distance to the nearest mode is
below 3 standard deviations of that mode; a mode is captured when at least one HQ point
falls to it; reverse KL compares the HQ points' distribution over modes with the uniform one
(0 when every mode gets the same share, log(#modes) when one mode gets them all).
PacGAN evaluates 2,500 samples.
"""

from __future__ import annotations

import numpy as np

from gan_dist.data.toy import MIXTURES

NUM_SAMPLES = 2500
HQ_STDS = 3.0


def mode_coverage(points: np.ndarray, mixture: str) -> dict[str, float]:
    """points [N, 2] -> modes captured, HQ fraction, reverse KL, and the mode count."""
    modes_fn, std = MIXTURES[mixture]
    modes = modes_fn()
    points = np.asarray(points, dtype=np.float64).reshape(len(points), 2)
    distances = np.linalg.norm(points[:, None, :] - modes[None, :, :], axis=2)
    nearest = distances.argmin(axis=1)
    hq = distances[np.arange(len(points)), nearest] < HQ_STDS * std
    counts = np.bincount(nearest[hq], minlength=len(modes))
    result = {"modes": int((counts > 0).sum()), "num_modes": len(modes), "hq_fraction": float(hq.mean()),
              "num_samples": len(points)}
    if counts.sum() == 0:
        result["reverse_kl"] = float("inf")  # nothing lands on any mode: as far from uniform as it gets
        return result
    share = counts[counts > 0] / counts.sum()
    result["reverse_kl"] = float(np.sum(share * np.log(share * len(modes))))
    return result
