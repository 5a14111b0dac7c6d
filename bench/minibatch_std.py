"""The minibatch-std layer's group variance: Tensor.var against the written-out form, on CPU.

    python bench/minibatch_std.py [--repeats 200] [--threads 1]

Times forward + backward of the group variance that gan_dist.models.layers.MinibatchStd
needs, at the shapes where the 2-D mixture configs' D applies it (batch 500, 400 hidden
features, groups of 4) and in a small conv D, both ways: `Tensor.var(dim=0, unbiased=False)`
and the layer's own `group_variance` (the mean of squared deviations, written out). Prints
a markdown table of the median milliseconds per call and the largest difference between
the two results.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from gan_dist.models.layers import group_variance

SHAPES = {"mlp2d D (500 x 400, groups of 4)": (4, 125, 400),
          "conv D (64 x 128 x 4 x 4, groups of 4)": (4, 16, 128, 4, 4)}
WARMUP_CALLS = 10  # dropped: the first calls also pay for allocator growth


def with_var(grouped: torch.Tensor) -> torch.Tensor:
    return grouped.var(dim=0, unbiased=False)


def median_ms(variance_fn, shape: tuple[int, ...], repeats: int) -> tuple[float, torch.Tensor]:
    """Median wall milliseconds of forward + backward, and the forward result of the last call."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0), requires_grad=True)
    times_ms = []
    for _ in range(repeats + WARMUP_CALLS):
        start = time.perf_counter()
        out = variance_fn(x)
        (out.sqrt().sum()).backward()
        times_ms.append(1e3 * (time.perf_counter() - start))
        x.grad = None
    return statistics.median(times_ms[WARMUP_CALLS:]), out.detach()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (the mixture configs pin 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), median of {args.repeats} calls\n")
    print("| shape | Tensor.var fwd+bwd | written out fwd+bwd | ratio | max abs difference |")
    print("|---|---|---|---|---|")
    for label, shape in SHAPES.items():
        var_ms, var_out = median_ms(with_var, shape, args.repeats)
        ours_ms, ours_out = median_ms(group_variance, shape, args.repeats)
        difference = (var_out - ours_out).abs().max().item()
        print(f"| {label} | {var_ms:.2f} ms | {ours_ms:.2f} ms | {var_ms / ours_ms:.1f}x | {difference:.1e} |")


if __name__ == "__main__":
    main()
