"""The metric arithmetic, from torch-fidelity so that numbers compare with published ones.

Every function takes features already extracted (float tensors [N, D], or logits [N, K]).
Statistics are computed in float64.
"""

from __future__ import annotations

import numpy as np
import torch
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import isc_features_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric

KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
IS_SPLITS = 10


def statistics(features: torch.Tensor) -> dict[str, np.ndarray]:
    """Mean and covariance (float64), what FID compares; small enough to cache."""
    return fid_features_to_statistics(features.detach().double().cpu())


def frechet_distance(stats_a: dict[str, np.ndarray], stats_b: dict[str, np.ndarray]) -> float:
    return float(fid_statistics_to_metric(stats_a, stats_b, verbose=False)["frechet_inception_distance"])


def kernel_distance(features_a: torch.Tensor, features_b: torch.Tensor, seed: int = 0, subsets: int = KID_SUBSETS,
                    subset_size: int = KID_SUBSET_SIZE) -> tuple[float, float]:
    """KID (unbiased MMD^2 with the cubic polynomial kernel): mean and std over random subsets.

    The subset size shrinks to the smaller set when there are fewer than 1,000 samples, and
    is recorded with the result by the caller."""
    subset_size = min(subset_size, len(features_a), len(features_b))
    out = kid_features_to_metric(features_a.detach().double().cpu(), features_b.detach().double().cpu(),
                                 kid_subsets=subsets, kid_subset_size=subset_size, verbose=False,
                                 kid_degree=3, kid_gamma=None, kid_coef0=1, rng_seed=seed, kid_kernel="poly")
    return out["kernel_inception_distance_mean"], out["kernel_inception_distance_std"]


def inception_score(logits: torch.Tensor, splits: int = IS_SPLITS) -> tuple[float, float]:
    """exp(E KL(p(y|x) || p(y))) over `splits` parts: mean and std."""
    out = isc_features_to_metric(logits.detach().cpu(), splits=splits, shuffle=True, rng_seed=2020)
    return out["inception_score_mean"], out["inception_score_std"]


def mean_pairwise_distance(features: torch.Tensor, max_samples: int = 2000, unit: bool = False) -> float:
    """Mean L2 distance between two different samples (the first `max_samples`): how spread out a
    set is in feature space. Samples of a collapsed G sit close together.

    unit: of the features scaled to length 1. A classifier's feature lengths grow with edge
    contrast, so raw distances shrink for faded or blurred samples as much as for a lost class:
    on bench/own_images.py's folder, real images at 70% contrast keep 0.68 of the raw spread,
    one class alone 0.50; scaled to length 1, 0.99 and 0.17 (docs/results.md).
    """
    x = features[:max_samples].double()
    if unit:
        x = torch.nn.functional.normalize(x, dim=1)
    n = len(x)
    if n < 2:
        return 0.0
    return float(torch.cdist(x, x).sum() / (n * (n - 1)))
