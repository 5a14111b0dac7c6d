"""Feature extractors. Each maps uint8 images [B, C, H, W] (or 2-D points) to a dict with
"features" [B, D] (what Fréchet and kernel distances compare) and "logits" [B, K] (what
the Inception Score reads), and has a `name` that keys the reference-statistics cache."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from gan_dist.errors import UserError

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"


class InceptionFeatures(nn.Module):
    """The TF "inception-2015-12-05" network of FID/KID/IS, as torch-fidelity ports it.

    torch-fidelity resizes to 299x299 with TF1-compatible bilinear interpolation (what the
    published numbers used) and scales pixels as (x - 128) / 128; grey images are repeated
    to three channels. Output: pool3 (2048-d) features and the 1008 unbiased logits."""

    name = "inception-2015-12-05"

    def __init__(self, weights_path: str = "", allow_download: bool = False):
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        path = resolve_inception_weights(weights_path, allow_download)
        try:
            self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                                   feature_extractor_weights_path=path, verbose=False)
        except (OSError, RuntimeError) as err:
            where = path or "torch's hub cache"
            raise UserError(f"cannot load the Inception weights from {where} ({type(err).__name__}: "
                            f"{str(err).splitlines()[0]}); download {INCEPTION_URL} and point at it with "
                            f"{WEIGHTS_SETTING}") from err

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        features, logits = self.net(images)
        return {"features": features, "logits": logits}


# The same weights are set two ways; a message names both.
WEIGHTS_SETTING = "gan-dist eval --inception-weights PATH (in training: eval.inception_weights=PATH)"


def resolve_inception_weights(weights_path: str, allow_download: bool) -> str | None:
    """The local weights file; None lets torch-fidelity fetch it (only when allowed)."""
    if weights_path:
        if not Path(weights_path).is_file():
            raise UserError(f"Inception weights {weights_path}: no such file. Download {INCEPTION_URL} on a "
                            f"machine with internet and put it there, or point at it with {WEIGHTS_SETTING}")
        return weights_path
    cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    if cached.is_file():
        return str(cached)
    if not allow_download:
        raise UserError(f"FID, KID and IS need the TF-Inception weights: download {INCEPTION_URL} and point at "
                        f"it with {WEIGHTS_SETTING} (or put the file at {cached}, or allow the download on a "
                        "machine with internet: gan-dist eval --allow-download, in training eval.allow_download=true)")
    return None
