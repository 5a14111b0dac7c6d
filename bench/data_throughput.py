"""How fast does the shard reader deliver, and how fast does training consume?

Part 1 writes synthetic 64x64 RGB uint8 datasets (smooth random images; npy per sample,
npy in chunks (prepare's default), png and jpg) and times what the training process receives
from `make_loader`: batches of 256, the default shuffle buffer, warm page cache (one untimed
run first), 0, 1 and 2 DataLoader workers streaming, and resident in host memory (no
workers), the median of 3 runs, each run a fresh loader in a fresh process, timed after 30
batches (the workers' prefetched batches would flatter them) over at least 60 batches and
2 s. `--before REV` times the same datasets with the loader of git revision REV (a temporary
worktree) beside the current one; a revision without chunks or resident mode gets "-" there.
Part 2 (skipped with --reader-only) runs short trainings and reads the trainer's own img/s
and data-wait fraction from metrics.jsonl: configs/default.yaml, the DCGAN-32 config
(configs/dcgan_mnist32.yaml on MNIST when --mnist-root has it, else the digits at 32 px),
and a DCGAN at 64 px.

    python bench/data_throughput.py [--before REV] [--reader-only] [--images 8192] [--mnist-root PATH]

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
# (row, prepare format, chunk, read mode, worker counts); chunk 0 is prepare's default.
LAYOUTS = (("npy, per sample", "npy", 1, "off", (0, 1, 2)), ("npy, chunked", "npy", 0, "off", (0, 1, 2)),
           ("png, per sample", "png", 0, "off", (0, 1, 2)), ("jpg, per sample", "jpg", 0, "off", (0, 1, 2)),
           ("npy, chunked, resident in host memory", "npy", 0, "host", (0,)))

# One timed run: a fresh loader of the given code, warm-up batches, then img/s over the rest.
CHILD = r"""
import inspect, json, sys, time
from gan_dist.config import DataConfig
from gan_dist.data import stream
assert stream.__file__.startswith(sys.argv[4]), stream.__file__
path, num_workers, min_batches, mode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[5]
info = stream.open_dataset(path)
options = inspect.signature(stream.make_loader).parameters
extra = {"cache_mb": 0} if "cache_mb" in options else {"resident": mode}  # before resident mode: no cache
loader = iter(stream.make_loader(info, 256, 0, 0, num_workers, shuffle_buffer=DataConfig().shuffle_buffer, **extra))
for _ in range(30):  # past the workers' prefetched batches (and the resident load): the steady state only
    next(loader)
start, count = time.perf_counter(), 0
while count < min_batches or time.perf_counter() - start < 2.0:
    next(loader)
    count += 1
print(json.dumps({"img_per_s": count * 256 / (time.perf_counter() - start)}))
"""


def smooth_images(count: int, resolution: int, seed: int = 0) -> np.ndarray:
    """Low-frequency colour noise: compresses like photographs, not like white noise."""
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.random((count, 3, 8, 8), dtype=np.float32))
    fine = torch.nn.functional.interpolate(coarse, size=(resolution, resolution), mode="bicubic")
    fine += torch.from_numpy(rng.normal(0, 0.03, fine.shape).astype(np.float32))
    return (fine.clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def dataset(work: Path, count: int, fmt: str, chunk: int) -> Path:
    """A synthetic 64 px dataset written by the current code (every revision reads the per-sample ones)."""
    from gan_dist.data.prepare import write_shards
    from gan_dist.data.sources import ArraySource

    out = work / f"64-{fmt}-chunk{chunk}"
    if not out.exists():
        source = ArraySource(smooth_images(count, 64), np.zeros(count, np.int64), [], "smooth 64px")
        write_shards(source, out, fmt=fmt, chunk=chunk)
    return out


def loader_rate(code: Path, dataset: Path, num_workers: int, mode: str) -> float | None:
    """img/s, or None where this revision cannot read the layout or has no such mode."""
    chunked = json.loads((dataset / "index.json").read_text()).get("chunk_size", 1) > 1
    if (chunked or mode != "off") and not (code / "gan_dist" / "data" / "resident.py").is_file():
        return None
    env = {**os.environ, "PYTHONPATH": str(code)}
    # Run from the code's root: `python -c` puts the working directory first on sys.path.
    result = subprocess.run([sys.executable, "-c", CHILD, str(dataset.resolve()), str(num_workers), "60",
                             str(code), mode], env=env, cwd=code, capture_output=True, text=True, check=False)
    if result.returncode:
        sys.exit(f"timing {code} on {dataset} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])["img_per_s"]


def _median(rates: list) -> float | None:
    return None if None in rates else statistics.median(rates)


def reader_rows(work: Path, count: int, codes: dict[str, Path]) -> list[tuple]:
    rows = []
    for what, fmt, chunk, mode, worker_counts in LAYOUTS:
        path = dataset(work, count, fmt, chunk)
        size_mib = sum(f.stat().st_size for f in path.glob("*.tar")) / 2**20
        loader_rate(ROOT, path, 0, "off")  # untimed: warms the page cache
        for num_workers in worker_counts:
            rates = {name: _median([loader_rate(code, path, num_workers, mode) for _ in range(3)])
                     for name, code in codes.items()}
            rows.append((f"64x64 RGB {what} ({size_mib:.0f} MiB)", num_workers if mode == "off" else "-", rates))
    return rows


def print_reader(rows: list[tuple], names: list[str]) -> None:
    ratio = " | after / before" if len(names) == 2 else ""
    print(f"| data | workers | {' | '.join(f'{n} img/s' for n in names)}{ratio} |")
    print("|---|---|" + "---|" * (len(names) + (1 if ratio else 0)))
    for what, num_workers, rates in rows:
        cells = " | ".join("-" if rates[n] is None else f"{rates[n]:,.0f}" for n in names)
        extra = "" if not ratio else " | -" if None in rates.values() else f" | {rates[names[1]] / rates[names[0]]:.2f}x"
        print(f"| {what} | {num_workers} | {cells}{extra} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8192, help="synthetic images per reader dataset")
    parser.add_argument("--before", default="", help="also time the loader of this git revision")
    parser.add_argument("--reader-only", action="store_true", help="skip the training rows")
    parser.add_argument("--mnist-root", default="", help="torchvision root holding MNIST/raw (else the digits)")
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
        ("training, configs/default.yaml", "as shipped (resident)",
         ("configs/default.yaml", "train.max_steps=3000", "log.every_steps=500")),
        (dcgan32_name, "as shipped (resident)", (*dcgan32, "train.max_steps=80", "log.every_steps=20")),
        (dcgan32_name, "streamed, 2 workers", (*dcgan32, "train.max_steps=80", "log.every_steps=20",
                                               "data.resident=off")),
        ("training, DCGAN-64 (digits at 64 px, width 1)", "as shipped (resident)",
         ("configs/dcgan_mnist32.yaml", "data.dataset=digits", "data.resolution=64", "model.conditional=false",
          "train.max_steps=24", "log.every_steps=6")),
    ]
    return [(what, setting, *train_rate(work, *run)) for what, setting, run in runs]


if __name__ == "__main__":
    sys.exit(main())
