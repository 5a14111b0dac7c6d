"""Quality results for docs/results.md: train configs over seeds and evaluate them.

    python bench/quality.py mixtures [--seeds 0 1 2] [--parallel 2] [--recipe classic|modern] [--root runs/quality] [key=value ...]
    python bench/quality.py mnist --data-root DIR [--models mlp,dcgan,r3gan] [--parallel 1]
        [--total-kimg dcgan=900 r3gan=130] [key=value ...]

`mixtures` trains configs/ring8.yaml and configs/grid25.yaml once per seed (their pinned one
thread per run, `--parallel` runs at a time, so two runs share a 2-core machine) and scores each with
`gan-dist eval --metrics modes2d` (PacGAN protocol, 2,500 samples): modes, HQ, reverse KL,
mean +- sd over seeds, and the training time of each run (from its last checkpoint's state.json).

`mnist` trains the tutorial MLP (configs/mlp_mnist.yaml) and the CPU DCGAN
(configs/dcgan_mnist32_cpu.yaml) on MNIST (with the configs' pinned thread counts; give `train.total_kimg=N` to fit a time budget), keeping every checkpoint,
then scores each
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

ROOT = Path(__file__).resolve().parents[1]


def train(config: str, name: str, root: Path, num_threads: int | None, *overrides: str) -> float:
    """Train in a subprocess (num_threads None: the config's own pin); returns wall seconds.
    A failed run stops the benchmark."""
    env, thread_overrides = dict(os.environ), []
    if num_threads is not None:
        env["OMP_NUM_THREADS"] = str(num_threads)
        thread_overrides = [f"train.num_threads={num_threads}"]
    command = [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / config),
               f"run.root={root}", f"run.name={name}", "run.overwrite=true", "train.resume=none",
               *thread_overrides, *overrides]
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
        config = f"{mixture}.yaml" if args.recipe == "classic" else f"{mixture}_{args.recipe}.yaml"
        train(config, name, args.root, args.num_threads, f"train.seed={seed}", *args.overrides)
        result = evaluate(args.root / name, "modes2d")["modes2d"]
        seconds = _snapshots(args.root / name)[-1][2]
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
        cells = [_mean_sd([r[k] * scale for r in rows], digits) for k, scale, digits in
                 (("modes", 1, 2), ("hq_fraction", 100, 1), ("reverse_kl", 1, 3))]
        print(f"| {mixture} | {cells[0]} | {cells[1]}% | {cells[2]} |")


def _mean_sd(values: list[float], digits: int) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {sd:.{digits}f}"


MNIST_MODELS = {"mlp": ("mlp_mnist.yaml", "mlp_mnist"), "dcgan": ("dcgan_mnist32_cpu.yaml", "dcgan_mnist32_cpu"),
                "r3gan": ("r3gan_mnist32.yaml", "r3gan_mnist32")}


def mnist(args) -> None:
    """Train the models (`--parallel` at a time), then score every kept checkpoint: the curve
    shows when the bar is reached, and at which training time."""
    lengths = dict(item.split("=") for item in args.total_kimg)

    def one(model: str) -> tuple[str, float]:
        config, name = MNIST_MODELS[model]
        length = [f"train.total_kimg={lengths[model]}"] if model in lengths else []
        return name, train(config, name, args.root, args.num_threads, f"data.root={args.data_root}",
                           "checkpoint.keep_last=0", *args.overrides, *length)

    if not (Path("data") / "mnist-32px").exists():  # once, before parallel runs would each prepare it
        subprocess.run([sys.executable, "-m", "gan_dist.cli", "prepare", "torchvision", "MNIST", "--root", args.data_root,
                        "--resolution", "32", "--out", "data/mnist-32px"], check=True, capture_output=True)
    with ThreadPoolExecutor(args.parallel) as pool:
        wall_s_by_run = list(pool.map(one, args.models))
    print("| model | step | kimg | training time | classifier IS | FD (classifier features) | classes |"
          " real held-out IS / FD |\n|---|---|---|---|---|---|---|---|", flush=True)
    for name, _ in wall_s_by_run:
        for step, kimg, time_s in _snapshots(args.root / name):
            result = evaluate(args.root / name, "cls", "--num", "10000", "--step", str(step))["cls"]
            shares = [100 * f for f in result["class_fractions"]]
            real = result["real_heldout"]
            print(f"| {name} | {step} | {kimg:.0f} | {time_s / 60:.1f} min | {result['is']:.2f} | {result['fd']:.1f} | "
                  f"{min(shares):.1f}-{max(shares):.1f}% | {real['is']:.2f} / {real['fd']:.1f} |", flush=True)
    print()  # the process wall times (start-up and final sampling included) stay out of the table
    for name, seconds in wall_s_by_run:
        print(f"{name}: {seconds / 60:.1f} min wall for the whole training process", flush=True)


def _snapshots(run_dir: Path) -> list[tuple[int, float, float]]:
    """(step, kimg, training seconds) of each finished checkpoint, read from its own state.json."""
    found = []
    for snapshot in sorted((run_dir / "checkpoints").glob("step_*")):
        digits = snapshot.name.removeprefix("step_")
        if not (snapshot.is_dir() and digits.isdigit()):  # skips unfinished saves (step_*.tmp) and strays
            continue
        state = json.loads((snapshot / "state.json").read_text())
        kimg = state["progress"]["num_d_steps"] * state["config"]["train"]["batch_size"] / 1000
        found.append((int(digits), kimg, state["elapsed_s"]))
    return found


def _model_list(text: str) -> list[str]:
    models = text.split(",")
    unknown = sorted(set(models) - set(MNIST_MODELS))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown model(s) {unknown}; choose from {sorted(MNIST_MODELS)}")
    return models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["mixtures", "mnist"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--parallel", type=int, default=2, help="runs at a time (mixtures, and mnist's models)")
    parser.add_argument("--recipe", choices=["classic", "modern"], default="classic",
                        help="mixtures: configs/<mixture>.yaml, or <mixture>_modern.yaml (R3GAN's recipe)")
    parser.add_argument("--root", type=Path, default=Path("runs/quality"))
    parser.add_argument("--data-root", help="mnist: the folder holding MNIST/raw (torchvision's layout)")
    parser.add_argument("--models", type=_model_list, default=["mlp", "dcgan"],
                        help=f"mnist: comma-separated, from {','.join(sorted(MNIST_MODELS))}")
    parser.add_argument("--total-kimg", nargs="*", default=[], metavar="MODEL=KIMG",
                        help="mnist: train.total_kimg per model, e.g. dcgan=900 r3gan=130 (equal wall time)")
    parser.add_argument("--num-threads", type=int, help="torch threads per run (default: each config's pin)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every run")
    args = parser.parse_intermixed_args()  # options may follow the key=value overrides
    if args.what == "mnist" and not args.data_root:
        parser.error("mnist needs --data-root DIR, the folder holding MNIST/raw")
    mixtures(args) if args.what == "mixtures" else mnist(args)


if __name__ == "__main__":
    main()
