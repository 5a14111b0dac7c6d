"""How fast does the shard reader deliver, and how fast does training consume?

Part 1 writes synthetic 64x64 RGB uint8 datasets (smooth random images; per-sample npy, png
and jpg) and times what the training process receives from `make_loader`: batches of 256,
the default shuffle buffer, no decoded-sample cache, warm page cache (one untimed run
first), 0, 1 and 2 DataLoader workers, the median of 3 runs, each run a fresh loader in a
fresh process, 60 batches timed after 30 (the workers' prefetched batches would flatter
them). `--before REV` times the same datasets with the loader of git revision REV
(a temporary worktree) beside the current one.
Part 2 (skipped with --reader-only) runs short trainings and reads the trainer's own img/s
and data-wait fraction from metrics.jsonl: configs/default.yaml, the DCGAN-32 config
(configs/dcgan_mnist32.yaml on MNIST when --mnist-root has it, else the digits at 32 px),
and a DCGAN at 64 px.

    python bench/data_throughput.py [--before REV] [--reader-only] [--images 8192] [--mnist-root ../shared/data]

Prints markdown tables (paste them into docs/benchmarks.md with the date and machine).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
BATCH = 256
FORMATS = ("npy", "png", "jpg")
WORKERS = (0, 1, 2)

# One timed run: a fresh loader of the given code, warm-up batches, then img/s over the rest.
CHILD = r"""
import json, sys, time
from gan_dist.config import DataConfig
from gan_dist.data import stream
assert stream.__file__.startswith(sys.argv[4]), stream.__file__
path, num_workers, num_batches = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
info = stream.open_dataset(path)
loader = iter(stream.make_loader(info, 256, 0, 0, num_workers, shuffle_buffer=DataConfig().shuffle_buffer, cache_mb=0))
for _ in range(30):  # past the workers' prefetched batches: time the steady state only
    next(loader)
start = time.perf_counter()
for _ in range(num_batches):
    next(loader)
print(json.dumps({"img_per_s": num_batches * 256 / (time.perf_counter() - start)}))
"""


def smooth_images(count: int, resolution: int, seed: int = 0) -> np.ndarray:
    """Low-frequency colour noise: compresses like photographs, not like white noise."""
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.random((count, 3, 8, 8), dtype=np.float32))
    fine = torch.nn.functional.interpolate(coarse, size=(resolution, resolution), mode="bicubic")
    fine += torch.from_numpy(rng.normal(0, 0.03, fine.shape).astype(np.float32))
    return (fine.clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def datasets(work: Path, count: int) -> dict[str, Path]:
    """The per-sample datasets every revision can read, written by the current code."""
    from gan_dist.data.prepare import write_shards
    from gan_dist.data.sources import ArraySource

    source = ArraySource(smooth_images(count, 64), np.zeros(count, np.int64), [], "smooth 64px")
    return {fmt: write_shards(source, work / f"64-{fmt}", fmt=fmt) for fmt in FORMATS}


def loader_rate(code: Path, dataset: Path, num_workers: int, num_batches: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(code)}
    # Run from the code's root: `python -c` puts the working directory first on sys.path.
    result = subprocess.run([sys.executable, "-c", CHILD, str(dataset.resolve()), str(num_workers), str(num_batches),
                             str(code)], env=env, cwd=code, capture_output=True, text=True, check=False)
    if result.returncode:
        sys.exit(f"timing {code} on {dataset} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])["img_per_s"]


def reader_rows(work: Path, count: int, codes: dict[str, Path]) -> list[tuple]:
    num_batches = 60
    rows = []
    for fmt, path in datasets(work, count).items():
        size_mib = sum(f.stat().st_size for f in path.glob("*.tar")) / 2**20
        loader_rate(ROOT, path, 0, 4)  # untimed: warms the page cache
        for num_workers in WORKERS:
            rates = {name: statistics.median(loader_rate(code, path, num_workers, num_batches) for _ in range(3))
                     for name, code in codes.items()}
            rows.append((f"64x64 RGB {fmt}, per sample ({size_mib:.0f} MiB)", num_workers, rates))
    return rows


def print_reader(rows: list[tuple], names: list[str]) -> None:
    ratio = " | after / before" if len(names) == 2 else ""
    print(f"| data | workers | {' | '.join(f'{n} img/s' for n in names)}{ratio} |")
    print("|---|---|" + "---|" * (len(names) + (1 if ratio else 0)))
    for what, num_workers, rates in rows:
        cells = " | ".join(f"{rates[n]:,.0f}" for n in names)
        extra = f" | {rates[names[1]] / rates[names[0]]:.2f}x" if ratio else ""
        print(f"| {what} | {num_workers} | {cells}{extra} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8192, help="synthetic images per reader dataset")
    parser.add_argument("--before", default="", help="also time the loader of this git revision")
    parser.add_argument("--reader-only", action="store_true", help="skip the training rows")
    parser.add_argument("--mnist-root", default="../shared/data", help="torchvision root holding MNIST/raw")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        codes = {"current": ROOT}
        if args.before:
            before = work / "before"
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(before), args.before],
                           check=True, capture_output=True)
            codes = {f"before ({args.before})": before, "after": ROOT}
        try:
            rows = reader_rows(work, args.images, codes)
        finally:
            if args.before:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(before)], check=False)
        print_reader(rows, list(codes))
        if not args.reader_only:
            print("\n| what | setting | img/s | data wait |\n|---|---|---|---|")
            for what, setting, rate, wait in training_rows(work, args.mnist_root):
                print(f"| {what} | {setting} | {rate:,.0f} | {wait:.1%} |")
    return 0


def train_rate(workdir: Path, config: str, *overrides: str) -> tuple[float, float]:
    """(img/s, data-wait fraction) of a short run, averaged over its log records after the first."""
    name = f"bench{abs(hash((config, overrides))) % 10**8}"
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / config), f"run.name={name}",
           f"run.root={workdir / 'runs'}", "run.overwrite=true", *overrides]
    subprocess.run(cmd, cwd=workdir, check=True, capture_output=True, text=True)
    records = [json.loads(line) for line in (workdir / "runs" / name / "metrics.jsonl").read_text().splitlines()]
    timed = records[1:-1] or records
    return (float(np.mean([r["Speed/img_per_s"] for r in timed])),
            float(np.mean([r["Speed/data_wait_fraction"] for r in timed])))


def training_rows(work: Path, mnist_root: str) -> list[tuple]:
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    mnist = Path(mnist_root) / "MNIST" / "raw"
    if mnist.is_dir():
        dcgan32 = ("configs/dcgan_mnist32.yaml", f"data.root={Path(mnist_root).resolve()}")
        dcgan32_name = "DCGAN-32 (configs/dcgan_mnist32.yaml, MNIST 60k)"
    else:
        dcgan32 = ("configs/dcgan_mnist32.yaml", "data.dataset=digits")
        dcgan32_name = "DCGAN-32 (configs/dcgan_mnist32.yaml on the digits at 32 px)"
    runs = [
        ("training, configs/default.yaml", "as shipped (0 workers, cache)",
         ("configs/default.yaml", "train.max_steps=3000", "log.every_steps=500")),
        (dcgan32_name, "as shipped (2 workers, cache)", (*dcgan32, "train.max_steps=80", "log.every_steps=20")),
        (dcgan32_name, "2 workers, no cache", (*dcgan32, "train.max_steps=80", "log.every_steps=20",
                                               "data.cache_mb=0")),
        ("training, DCGAN-64 (digits at 64 px, width 1)", "2 workers, cache",
         ("configs/dcgan_mnist32.yaml", "data.dataset=digits", "data.resolution=64", "model.conditional=false",
          "train.max_steps=24", "log.every_steps=6")),
    ]
    return [(what, setting, *train_rate(work, *run)) for what, setting, run in runs]


if __name__ == "__main__":
    sys.exit(main())
