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

Each row runs in its own process (accelerate allows one precision per process, and the peak
memory must be the row's own) and is appended to --out as it finishes. A dry run keeps all but
the first row in one process, to save their start-up.

--dry-run checks every row's config and models and counts its FLOPs on the CPU, and trains
the fp32 rows (bare loop included) for 2 steps at batch 4, without timing: the check that the
script is ready before a GPU is borrowed (bf16 and compile are too slow to train on a CPU).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import traceback
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


def row(model: str, variant: str, args) -> str:
    """One row, in this process. On a GPU each row gets a process of its own (accelerate's
    process-wide state takes one precision per process, and peak memory must be the row's own);
    dry runs share one, as they all train in fp32 and measure no memory."""
    from gan_dist.config import load_config

    config, shape, model_overrides = MODELS[model]
    variant_overrides = VARIANTS.get(variant, [])
    batch = 4 if args.dry_run else BATCH
    overrides = [*overhead.COMMON, *model_overrides, *variant_overrides, f"train.batch_size={batch}",
                 "log.every_steps=10"]
    cfg = load_config(str(overhead.ROOT / "configs" / config), overrides)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    flops = flops_per_image(cfg, shape, 2 if args.dry_run else 8, device)
    steps, warmup = (2, 1) if args.dry_run else (args.steps, args.warmup)
    if args.dry_run and variant_overrides != ["train.mixed_precision=no"] and variant != "bare loop fp32":
        # bf16 convolutions are about 20x slower on CPUs, and compiling takes minutes there:
        # these rows check their config, models and FLOPs, and train only on a GPU.
        return f"| {model} | {variant} | (dry run: config and models checked) | - | {flops / 1e9:.2f} GFLOP/img |"
    images = torch.randint(0, 256, (batch * 4, *shape), dtype=torch.uint8)
    if device.type == "cuda":
        images = images.pin_memory()
        torch.cuda.reset_peak_memory_stats()
    if variant == "bare loop fp32":
        speed = overhead.run_bare(cfg, images, steps, warmup, device=device)
    else:
        speed = overhead.run_ours(config, overrides, images, steps, warmup,
                                  sync_check=device.type == "cuda" and variant.startswith("bf16"))
    if args.dry_run:
        return f"| {model} | {variant} | (dry run: config checked, 2 steps trained on CPU) | - | {flops / 1e9:.2f} GFLOP/img |"
    peak_gib = torch.cuda.max_memory_allocated() / 2**30
    return f"| {model} | {variant} | {speed:,.0f} | {peak_gib:.2f} | {flops * speed / 1e12:.1f} |"


def _rows() -> list[tuple[str, str]]:
    return [(model, variant) for model in MODELS
            for variant in (["bare loop fp32", *VARIANTS] if model == "DCGAN-64" else list(VARIANTS))]


def _run_row(model: str, variant: str, args, in_process: bool) -> str:
    """The row's table line, or a FAILED line naming the error (a `|` in it would split the cell)."""
    if in_process:
        try:
            return row(model, variant, args)
        except Exception as err:  # noqa: BLE001 - a broken row is reported in the table, the others still run
            traceback.print_exc()  # the whole story on stderr; the table keeps one line
            first_line = (str(err).splitlines() or [""])[0].replace("|", "/")[:200]
            return f"| {model} | {variant} | FAILED: {type(err).__name__}: {first_line} | | |"
    command = [sys.executable, __file__, "--row", model, variant, "--steps", str(args.steps),
               "--warmup", str(args.warmup), *(["--dry-run"] if args.dry_run else [])]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    lines_out = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    if result.returncode or not lines_out:
        why = (result.stderr.strip().splitlines() or ["no output"])[-1].replace("|", "/")[:200]
        return f"| {model} | {variant} | FAILED: {why} | | |"
    return lines_out[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=15)
    parser.add_argument("--out", type=Path, default=Path("bench/results/gpu.md"))
    parser.add_argument("--row", nargs=2, metavar=("MODEL", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.row:
        print(row(*args.row, args), flush=True)
        return
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("bench/gpu.py: no CUDA GPU visible; use --dry-run to check the configurations on a CPU")
    title = (f"{'dry run on CPU' if args.dry_run else torch.cuda.get_device_name()}, batch {BATCH}, "
             f"{time.strftime('%Y-%m-%d')}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    lines = [title, "", "| model | variant | img/s | peak GiB | TFLOP/s |", "|---|---|---|---|---|"]
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    failed = False
    for index, (model, variant) in enumerate(_rows()):
        start = time.perf_counter()
        # A dry run trains fp32 rows only, so one process can hold them all; its first row still
        # goes through the per-row process a GPU run uses, so that path is checked too.
        line = _run_row(model, variant, args, in_process=args.dry_run and index > 0)
        failed |= "FAILED" in line
        with args.out.open("a") as table:  # each row as it finishes: a timeout keeps what is done
            table.write(line + "\n")
        print(f"{line}  ({time.perf_counter() - start:.0f} s)", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
