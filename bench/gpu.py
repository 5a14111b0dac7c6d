"""The GPU fast path, measured: DCGAN-64 and the ResNet-32 (SNGAN) config at batch 256 in fp32,
bf16, and bf16 + channels_last + torch.compile, beside the hand-written loop (bench/overhead.py)
in fp32. Run through bench/gpu.sh, which keeps the whole run within 4 minutes.

    python bench/gpu.py [--dry-run] [--steps 40] [--warmup 15] [--out bench/results/gpu.md]

Each row: img/s over `--steps` steps after `--warmup` (compile happens in the warm-up), peak
GPU memory, and achieved TFLOP/s for the model's counted FLOPs (torch.utils.flop_counter on
one D step and one G step, forward and backward). Rows print as they finish; the markdown
table is also written to --out. The bf16 rows of gan_dist run their hot loop (the steps
between log intervals) under torch.cuda.set_sync_debug_mode("error"): any host
synchronisation there fails the row.

--dry-run builds every configuration on the CPU, checks it, and counts its FLOPs at batch 2,
without timing: the check that the script is ready before a GPU is borrowed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import overhead  # bench/overhead.py: the in-memory trainer run and the bare loop)

BATCH = 256
MODELS = {  # name: (config, sample shape, overrides)
    "DCGAN-64": ("dcgan_mnist32.yaml", (3, 64, 64), ["model.conditional=false", "model.width_mult=1"]),
    "ResNet-32": ("sngan_cifar10.yaml", (3, 32, 32), ["train.n_critic=1"]),
}
VARIANTS = {  # name: overrides
    "fp32": ["train.mixed_precision=no"],
    "bf16": ["train.mixed_precision=bf16"],
    "bf16+channels_last+compile": ["train.mixed_precision=bf16", "train.channels_last=true", "train.compile=true"],
}


def flops_per_image(cfg, shape: tuple, batch: int, device) -> float:
    """FLOPs of one D step and one G step (forward + backward), per real image."""
    from torch.utils.flop_counter import FlopCounterMode

    from gan_dist.models import build_models

    G, D = (m.to(device) for m in build_models(cfg.model, shape, 0))
    z = torch.randn(batch, cfg.model.latent_dim, device=device)
    real = torch.rand(batch, *shape, device=device)
    with FlopCounterMode(display=False) as counter:
        fake = G(z)
        (D(real).mean() + D(fake.detach()).mean()).backward()
        D(G(z)).mean().backward()
    return counter.get_total_flops() / batch


def row(model: str, variant: str, args, device) -> str:
    from gan_dist.config import load_config

    config, shape, model_overrides = MODELS[model]
    overrides = [*overhead.COMMON, *model_overrides, *VARIANTS.get(variant, []), f"train.batch_size={BATCH}",
                 "log.every_steps=10"]
    cfg = load_config(str(overhead.ROOT / "configs" / config), overrides)
    flops = flops_per_image(cfg, shape, 2 if args.dry_run else 8, device)
    if args.dry_run:
        return f"| {model} | {variant} | (dry run: config checked) | - | {flops / 1e9:.2f} GFLOP/img |"
    images = torch.randint(0, 256, (BATCH * 4, *shape), dtype=torch.uint8).pin_memory()
    torch.cuda.reset_peak_memory_stats()
    if variant == "bare loop fp32":
        speed = overhead.run_bare(cfg, images, args.steps, args.warmup, device=device)
    else:
        speed = overhead.run_ours(config, overrides, images, args.steps, args.warmup,
                                  sync_check=variant.startswith("bf16"))
    peak_gib = torch.cuda.max_memory_allocated() / 2**30
    return f"| {model} | {variant} | {speed:,.0f} | {peak_gib:.2f} | {flops * speed / 1e12:.1f} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=15)
    parser.add_argument("--out", type=Path, default=Path("bench/results/gpu.md"))
    args = parser.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("bench/gpu.py: no CUDA GPU visible; use --dry-run to check the configurations on a CPU")
    device = torch.device("cpu" if args.dry_run else "cuda")
    title = (f"{'dry run on CPU' if args.dry_run else torch.cuda.get_device_name()}, batch {BATCH}, "
             f"{time.strftime('%Y-%m-%d')}")
    lines = [title, "", "| model | variant | img/s | peak GiB | TFLOP/s |", "|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for model in MODELS:
        for variant in ["bare loop fp32", *VARIANTS] if model == "DCGAN-64" else list(VARIANTS):
            start = time.perf_counter()
            try:
                line = row(model, variant, args, device)
            except Exception as err:  # noqa: BLE001 - a failed row is reported and the run goes on
                line = f"| {model} | {variant} | FAILED: {type(err).__name__}: {str(err)[:150]} | | |"
            lines.append(line)
            print(f"{line}  ({time.perf_counter() - start:.0f} s)", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    if any("FAILED" in line for line in lines):
        sys.exit(1)


if __name__ == "__main__":
    main()
