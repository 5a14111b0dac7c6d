"""How fast does the shard reader deliver, and how fast does training consume?

Part 1 writes synthetic RGB datasets (smooth random images, 32x32 and 64x64, npy and png)
and times `make_loader` alone (no cache, batch 64) with 0, 1 and 2 DataLoader workers.
Part 2 runs short trainings and reads the trainer's own img/s and data-wait fraction from
metrics.jsonl: configs/default.yaml, the DCGAN-32 config (configs/dcgan_mnist32.yaml on
MNIST when --mnist-root has it, else the digits at 32 px), and a DCGAN at 64 px.

    python bench/data_throughput.py [--mnist-root ../shared/data] [--images 4096]

Prints one markdown table (paste it into docs/benchmarks.md with the date and machine).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from gan_dist.data.prepare import write_shards
from gan_dist.data.sources import ArraySource
from gan_dist.data.stream import make_loader, open_dataset

ROOT = Path(__file__).resolve().parents[1]


def smooth_images(count: int, resolution: int, seed: int = 0) -> np.ndarray:
    """Low-frequency colour noise: compresses like photographs, not like white noise."""
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.random((count, 3, 8, 8), dtype=np.float32))
    fine = torch.nn.functional.interpolate(coarse, size=(resolution, resolution), mode="bicubic")
    fine += torch.from_numpy(rng.normal(0, 0.03, fine.shape).astype(np.float32))
    return (fine.clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def reader_rate(path: Path, num_workers: int, num_batches: int = 60, warmup: int = 5) -> float:
    info = open_dataset(str(path))
    loader = iter(make_loader(info, 64, 0, 0, num_workers, shuffle_buffer=1000, cache_mb=0))
    for _ in range(warmup):
        next(loader)
    start = time.perf_counter()
    for _ in range(num_batches):
        next(loader)
    return num_batches * 64 / (time.perf_counter() - start)


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4096, help="synthetic images per reader dataset")
    parser.add_argument("--mnist-root", default="../shared/data", help="torchvision root holding MNIST/raw")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for resolution in (32, 64):
            images = smooth_images(args.images, resolution)
            source = ArraySource(images, np.zeros(len(images), np.int64), [], f"smooth {resolution}px")
            for fmt in ("npy", "png"):
                path = write_shards(source, work / f"{resolution}-{fmt}", fmt=fmt)
                size_mb = sum(f.stat().st_size for f in path.glob("*.tar")) / 2**20
                for workers in (0, 1, 2):
                    rows.append((f"reader, {resolution}x{resolution} RGB {fmt} ({size_mb:.1f} MiB)",
                                 f"{workers} workers", reader_rate(path, workers), None))
        rows += training_rows(work, args.mnist_root)
    print("| what | setting | img/s | data wait |\n|---|---|---|---|")
    for what, setting, rate, wait in rows:
        print(f"| {what} | {setting} | {rate:,.0f} | {'' if wait is None else f'{wait:.1%}'} |")
    return 0


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
