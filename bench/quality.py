"""Quality results for docs/results.md: train configs over seeds and evaluate them.

    python bench/quality.py mixtures [--seeds 0 1 2] [--parallel 2] [--root runs/quality]
    python bench/quality.py mnist --data-root ../shared/data [--models dcgan] [--threads 1] [key=value ...]

`mixtures` trains configs/ring8.yaml and configs/grid25.yaml once per seed (one thread per
run, `--parallel` runs at a time, so two runs share a 2-core machine) and scores each with
`gan-dist eval --metrics modes2d` (PacGAN protocol, 2,500 samples): modes, HQ, reverse KL,
mean +- sd over seeds, and the training time of each run.

`mnist` trains the tutorial MLP (configs/mlp_mnist.yaml) and the DCGAN
(configs/dcgan_mnist32.yaml) on MNIST (two torch threads each unless `--threads`; give
`train.total_kimg=N` to fit a time budget), keeping every checkpoint, then scores each
checkpoint with `--metrics cls` (classifier-based IS and Fréchet distance on 10,000
samples, beside the held-out real data), with the training time at which it was written.

Both print a markdown table, each row as it finishes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def train(config: str, name: str, root: Path, threads: int, *overrides: str) -> float:
    """Train in a subprocess; returns wall seconds. A failed run stops the benchmark."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    command = [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / config),
               f"run.root={root}", f"run.name={name}", "run.overwrite=true", "train.resume=none",
               f"train.num_threads={threads}", *overrides]
    start = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if result.returncode:
        sys.exit(f"training {name} failed:\n{result.stderr[-3000:]}")
    return time.perf_counter() - start


def evaluate(run_dir: Path, metrics: str, *extra: str) -> dict:
    command = [sys.executable, "-m", "gan_dist.cli", "eval", "--run", str(run_dir), "--metrics", metrics,
               "--json", *extra]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode:
        sys.exit(f"evaluating {run_dir} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout)["results"]


def mixtures(args) -> None:
    jobs = [(mixture, seed) for mixture in ("ring8", "grid25") for seed in args.seeds]

    def one(job):
        mixture, seed = job
        name = f"{mixture}-seed{seed}"
        seconds = train(f"{mixture}.yaml", name, args.root, 1, f"train.seed={seed}", *args.overrides)
        result = evaluate(args.root / name, "modes2d")["modes2d"]
        print(f"| {mixture} | {seed} | {result['modes']}/{result['num_modes']} | {100 * result['hq_fraction']:.1f}% "
              f"| {result['reverse_kl']:.3f} | {seconds / 60:.1f} min |", flush=True)
        return mixture, result

    for mixture in ("ring8", "grid25"):  # once, before parallel runs would each prepare it
        if not (Path("data") / mixture).exists():
            subprocess.run([sys.executable, "-m", "gan_dist.cli", "prepare", mixture, "--out", f"data/{mixture}"],
                           check=True, capture_output=True)
    print("| mixture | seed | modes | HQ | reverse KL | training time |\n|---|---|---|---|---|---|", flush=True)
    with ThreadPoolExecutor(args.parallel) as pool:
        results = list(pool.map(one, jobs))
    print("\n| mixture | modes (mean ± sd) | HQ | reverse KL |\n|---|---|---|---|")
    for mixture in ("ring8", "grid25"):
        rows = [r for m, r in results if m == mixture]
        cells = [_mean_sd([r[k] * scale for r in rows]) for k, scale in
                 (("modes", 1), ("hq_fraction", 100), ("reverse_kl", 1))]
        print(f"| {mixture} | {cells[0]} | {cells[1]}% | {cells[2]} |")


def _mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {sd:.2f}"


MNIST_MODELS = {"mlp": ("mlp_mnist.yaml", "mlp_mnist"), "dcgan": ("dcgan_mnist32.yaml", "dcgan_mnist32")}


def mnist(args) -> None:
    """Train each model once, then score every kept checkpoint: the curve shows when the bar is reached."""
    print("| model | step | kimg | training time | classifier IS | FD (classifier features) | classes |"
          " real held-out IS / FD |\n|---|---|---|---|---|---|---|---|", flush=True)
    for model in args.models:
        config, name = MNIST_MODELS[model]
        seconds = train(config, name, args.root, args.threads, f"data.root={args.data_root}",
                        "checkpoint.keep_last=0", *args.overrides)
        metrics = [json.loads(line) for line in (args.root / name / "metrics.jsonl").read_text().splitlines()]
        final_kimg = metrics[-1]["kimg"]
        for snapshot in sorted((args.root / name / "checkpoints").glob("step_*")):
            step = int(snapshot.name.removeprefix("step_"))
            result = evaluate(args.root / name, "cls", "--num", "10000", "--step", str(step))["cls"]
            kimg = step * final_kimg / metrics[-1]["step"]
            shares = [100 * f for f in result["class_fractions"]]
            real = result["real_heldout"]
            # Training time at the checkpoint, interpolated between the logged (kimg, time) points.
            at = float(np.interp(kimg, [0.0] + [m["kimg"] for m in metrics], [0.0] + [m["time_s"] for m in metrics]))
            print(f"| {name} | {step} | {kimg:.0f} | {at / 60:.1f} min | {result['is']:.2f} | {result['fd']:.1f} | "
                  f"{min(shares):.1f}-{max(shares):.1f}% | {real['is']:.2f} / {real['fd']:.1f} |", flush=True)
        print(f"({name}: {seconds / 60:.1f} min wall for the whole training process)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["mixtures", "mnist"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--root", type=Path, default=Path("runs/quality"))
    parser.add_argument("--data-root", default="../shared/data")
    parser.add_argument("--models", nargs="+", choices=sorted(MNIST_MODELS), default=["mlp", "dcgan"])
    parser.add_argument("--threads", type=int, default=2, help="torch threads of each MNIST run")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every run")
    args = parser.parse_intermixed_args()  # options may follow the key=value overrides
    mixtures(args) if args.what == "mixtures" else mnist(args)


if __name__ == "__main__":
    main()
