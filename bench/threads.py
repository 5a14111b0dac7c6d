"""CPU threads per process against loader workers: the table behind the default thread rule
(docs/benchmarks.md, "CPU threads").

    python bench/threads.py --mnist-root PATH [--root runs/threads] [--repeats 5] [--seconds 12]

MNIST prepared at 28, 32 and 64 px (npy, streamed: data.resident=off, so the loader workers
really read), and once more at 64 px as PNG, whose decoding keeps the workers busy. Each row
is a model and a number of loader workers; each cell trains it with train.num_threads=1 and
2 (this machine's cores) for about `--seconds` after a warm-up and reads the steady-state
img/s from the run's own log lines. Runs are interleaved (every cell once, then again) and
each cell is the median of `--repeats`. The last columns say what the default rule
(train.num_threads=0) picks for the row and how far that is from the row's best.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ["loss.name=nonsaturating", "train.n_critic=1", "log.sample_every_kimg=1e9", "checkpoint.every_kimg=0",
          "checkpoint.every_minutes=0", "train.total_kimg=1e6", "data.resident=off", "run.overwrite=true",
          "train.resume=none", "model.conditional=false"]
# model: (config, dataset, overrides, steps per log line so that a line comes about every 2 s)
MODELS = {
    "mlp-28": ("mlp_mnist.yaml", "mnist28", [], 200),
    "dcgan-32 (CPU recipe)": ("dcgan_mnist32_cpu.yaml", "mnist32", [], 20),
    "dcgan-64 (pytorch/examples' shape)": ("dcgan_mnist32_cpu.yaml", "mnist64",
                                            ["model.width_mult=1", "model.latent_dim=100"], 2),
}
ROWS = [(model, workers, "npy") for model in MODELS for workers in (0, 1, 2)] + \
       [("dcgan-64 (pytorch/examples' shape)", 2, "png")]


def prepare(mnist_root: Path, root: Path) -> dict[str, Path]:
    out = {}
    for name, resolution, fmt in (("mnist28", 28, "npy"), ("mnist32", 32, "npy"), ("mnist64", 64, "npy"),
                                  ("mnist64png", 64, "png")):
        out[name] = root / "data" / name
        if not (out[name] / "index.json").is_file():
            subprocess.run([sys.executable, "-m", "gan_dist.cli", "prepare", "torchvision", "MNIST", "--root",
                            str(mnist_root), "--no-download", "--resolution", str(resolution), "--format", fmt,
                            "--out", str(out[name]), "--force"], check=True, capture_output=True)
    return out


def train_img_per_s(row: tuple, threads: int, seconds: float, data: dict[str, Path], root: Path) -> float:
    """Steady-state img/s of one run: from its second log line to its last."""
    model, workers, fmt = row
    config, dataset, overrides, every = MODELS[model]
    dataset += "png" if fmt == "png" else ""
    lines = 3 + int(seconds // 2)
    name = f"row{ROWS.index(row)}-{threads}"
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # the rule reads it; the bench pins
    command = [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / config), *SHARED,
               f"data.path={data[dataset]}", f"data.num_workers={workers}", f"train.num_threads={threads}",
               f"run.root={root / 'runs'}", f"run.name={name}", f"log.every_steps={every}",
               f"train.max_steps={every * lines}", *overrides]
    subprocess.run(command, check=True, capture_output=True, env=env)
    rows = [json.loads(line) for line in (root / "runs" / name / "metrics.jsonl").read_text().splitlines()
            if '"time_s"' in line]
    first, last = rows[1], rows[-1]
    return (last["kimg"] - first["kimg"]) * 1000 / (last["time_s"] - first["time_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mnist-root", required=True, help="directory holding MNIST/raw/")
    parser.add_argument("--root", default="runs/threads")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=12)
    args = parser.parse_args()
    from gan_dist.parallel.device import default_num_threads, usable_cores

    root = Path(args.root).resolve()
    data = prepare(Path(args.mnist_root).resolve(), root)
    cores = usable_cores()
    settings = sorted({1, cores})
    results: dict[tuple, list[float]] = {(row, t): [] for row in ROWS for t in settings}
    for repeat in range(args.repeats):
        for row in ROWS:
            for threads in settings:
                results[row, threads].append(train_img_per_s(row, threads, args.seconds, data, root))
        print(f"repeat {repeat + 1}/{args.repeats} done", file=sys.stderr, flush=True)
    print(f"{cores} cores; img/s, median of {args.repeats} interleaved runs\n")
    print("| model | loader workers | data | " + " | ".join(f"{t} thread{'s' * (t > 1)}" for t in settings) +
          " | default picks | default vs best |")
    print("|---|---|---|" + "---|" * len(settings) + "---|---|")
    for row in ROWS:
        medians = {t: statistics.median(results[row, t]) for t in settings}
        picked = min(default_num_threads(), max(settings))
        cells = " | ".join(f"{medians[t]:.0f}" for t in settings)
        print(f"| {row[0]} | {row[1]} | {row[2]} | {cells} | {picked} | {medians[picked] / max(medians.values()):.0%} |")


if __name__ == "__main__":
    main()
