"""Test plugin: an `mlp` whose D records the dtype of the logits its last layer computes.

The hook sits on D's last Linear layer: accelerate converts the outputs of the whole
prepared model back to fp32 after autocast, so only inside is the compute dtype visible.
"""

from torch import nn

from gan_dist.models import register_model
from gan_dist.models.mlp import build_mlp

D_OUTPUT_DTYPES: list = []


@register_model("bf16_probe_mlp")
def build(cfg, shape, num_classes):
    G, D = build_mlp(cfg, shape, num_classes)
    last_linear = [m for m in D.modules() if isinstance(m, nn.Linear)][-1]
    last_linear.register_forward_hook(lambda module, args, output: D_OUTPUT_DTYPES.append(output.dtype))
    return G, D
