"""Test plugin: an `mlp` whose D returns NaN from its 4th call on (for --debug tests)."""

import torch

from gan_dist.models import register_model
from gan_dist.models.mlp import build_mlp


class NaNAfter(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module, calls: int):
        super().__init__()
        self.inner, self.calls, self.seen = inner, calls, 0

    def forward(self, x, labels=None):
        self.seen += 1
        out = self.inner(x, labels)
        return out * float("nan") if self.seen > self.calls else out


@register_model("nan_mlp")
def build(cfg, shape, num_classes):
    G, D = build_mlp(cfg, shape, num_classes)
    return G, NaNAfter(D, calls=6)
