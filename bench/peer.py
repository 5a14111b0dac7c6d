"""gan_dist against pytorch/examples' dcgan, the script many users would copy instead: the
same DCGAN-64 on MNIST on this machine's CPU, side by side (docs/benchmarks.md, "Against
pytorch/examples' dcgan").

    git clone https://github.com/pytorch/examples pytorch-examples     (the peer; not part of gan_dist)
    python bench/peer.py --peer pytorch-examples/dcgan/main.py --mnist-root PATH [--repeats 3] [--seconds 60]

The peer runs as its README says, `main.py --dataset mnist --workers 1 --niter 1 --manualSeed 1`
(on the CPU; MNIST from --mnist-root/MNIST/raw, which it does not download when the files
are there); its img/s is read from the times its per-iteration lines arrive. Ours trains the
matching config: nz 100, 64 filters, BatchNorm in G and D, batch 64, Adam 2e-4 (0.5, 0.999),
fp32, one loader worker, the non-saturating loss, every other setting its default (the
thread rule, resident data, G_ema), once as is and once with train.reuse_fakes=true (the
peer also reuses the D step's fakes). Runs alternate (ours, ours reusing, peer, ...); each
is measured for about `--seconds` after a warm-up; the table gives medians and the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WARMUP_ITERATIONS = 10
PEER_LINE = re.compile(r"^\[0/1\]\[(\d+)/(\d+)\]")
OURS = ["--config", str(ROOT / "configs" / "dcgan_mnist32_cpu.yaml"), "model.width_mult=1", "model.latent_dim=100",
        "model.g_norm=batch", "model.d_norm=batch", "model.conditional=false", "loss.name=nonsaturating",
        "train.batch_size=64", "train.num_threads=0", "data.num_workers=1", "train.mixed_precision=no",
        "log.sample_every_kimg=1e9", "checkpoint.every_kimg=0", "checkpoint.every_minutes=0", "train.total_kimg=1e6",
        "run.overwrite=true", "train.resume=none", "log.every_steps=10"]


def peer_img_per_s(peer: Path, mnist_root: Path, out: Path, seconds: float) -> float:
    """The peer's img/s from the arrival times of its iteration lines, after a warm-up."""
    out.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    command = [sys.executable, "-u", str(peer), "--dataset", "mnist", "--dataroot", str(mnist_root), "--workers", "1",
               "--niter", "1", "--manualSeed", "1", "--outf", str(out)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
                               cwd=out)
    start = None
    try:
        for line in process.stdout:
            match = PEER_LINE.match(line)
            if not match:
                continue
            i, now = int(match.group(1)), time.perf_counter()
            if i == WARMUP_ITERATIONS:
                start = (i, now)
            elif start and now - start[1] >= seconds:
                return 64 * (i - start[0]) / (now - start[1])
    finally:
        process.kill()
        process.wait()
    sys.exit(f"the peer stopped before {seconds} s of training: run its command by hand to see why:\n{' '.join(command)}")


def ours_img_per_s(data: Path, root: Path, seconds: float, extra: list[str]) -> float:
    """Our img/s from the run's own log lines (every 10 steps), from the second to the last."""
    steps = 10 * (2 + int(seconds * 50 / 640))  # about `seconds` at 50 img/s, plus the warm-up line
    name = "reuse" if extra else "ours"
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    subprocess.run([sys.executable, str(ROOT / "train.py"), *OURS, f"data.path={data}", f"run.root={root}",
                    f"run.name={name}", f"train.max_steps={steps}", *extra], check=True, capture_output=True, env=env)
    rows = [json.loads(line) for line in (root / name / "metrics.jsonl").read_text().splitlines() if '"time_s"' in line]
    return (rows[-1]["kimg"] - rows[1]["kimg"]) * 1000 / (rows[-1]["time_s"] - rows[1]["time_s"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peer", type=Path, help="pytorch/examples' dcgan/main.py")
    parser.add_argument("--mnist-root", type=Path, required=True, help="directory holding MNIST/raw/")
    parser.add_argument("--root", type=Path, default=Path("runs/peer"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=60)
    args = parser.parse_args()
    if args.peer is None or not args.peer.is_file():
        print("bench/peer.py needs pytorch/examples' dcgan script, which gan_dist does not ship: "
              "git clone https://github.com/pytorch/examples pytorch-examples, then "
              "--peer pytorch-examples/dcgan/main.py", file=sys.stderr)
        return 2
    root, mnist_root = args.root.resolve(), args.mnist_root.resolve()
    data = root / "mnist64"
    if not (data / "index.json").is_file():
        subprocess.run([sys.executable, "-m", "gan_dist.cli", "prepare", "torchvision", "MNIST", "--root", str(mnist_root),
                        "--no-download", "--resolution", "64", "--out", str(data), "--force"], check=True,
                       capture_output=True)
    speeds: dict[str, list[float]] = {"gan_dist, defaults": [], "gan_dist, train.reuse_fakes=true": [],
                                      "pytorch/examples dcgan": []}
    for _ in range(args.repeats):
        speeds["gan_dist, defaults"].append(ours_img_per_s(data, root / "runs", args.seconds, []))
        speeds["gan_dist, train.reuse_fakes=true"].append(
            ours_img_per_s(data, root / "runs", args.seconds, ["train.reuse_fakes=true"]))
        speeds["pytorch/examples dcgan"].append(peer_img_per_s(args.peer.resolve(), mnist_root, root / "peer",
                                                               args.seconds))
    peer = statistics.median(speeds["pytorch/examples dcgan"])
    print(f"DCGAN-64 on MNIST, CPU, {os.cpu_count()} cores; img/s, median of {args.repeats} alternating runs "
          f"of about {args.seconds:.0f} s\n")
    print("| run | img/s (each run) | median | vs peer |\n|---|---|---|---|")
    for name, values in speeds.items():
        median = statistics.median(values)
        print(f"| {name} | {', '.join(f'{v:.1f}' for v in values)} | {median:.1f} | {median / peer:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
