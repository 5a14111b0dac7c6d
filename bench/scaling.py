"""Data-parallel scaling on CPU: 1 process against 2 gloo processes at the same per-process batch.

    python bench/scaling.py [--configs mlp dcgan32] [--repeats 3] [--steps 120] [--batch 64]

Each run is the real `train.py` (the 8x8 digits resized to the config's resolution, read from
shards with no loader workers, one torch thread per process); 2 processes are launched with
torchrun. img/s comes from metrics.jsonl (`Speed/img_per_s`, the first log interval left
out as warm-up). Efficiency = (2-process img/s) / (2 x 1-process img/s). Runs alternate,
and the table gives medians.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"mlp": ("mlp_mnist.yaml", 28, []), "dcgan32": ("dcgan_mnist32.yaml", 32, ["model.conditional=false"])}


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(config: str, data: Path, root: Path, processes: int, batch_per_process: int, steps: int,
        extra: list[str]) -> float:
    launcher = [sys.executable] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
        "--master_addr", "127.0.0.1", "--master_port", str(_port())]
    name = f"p{processes}"
    command = [*launcher, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / config), f"data.path={data}",
               f"run.root={root}", f"run.name={name}", "run.overwrite=true", "train.resume=none",
               f"train.batch_size={batch_per_process * processes}", f"train.max_steps={steps}",
               "train.num_threads=1", "data.num_workers=0", "log.every_steps=20", "log.sample_every_kimg=1e9",
               "checkpoint.every_kimg=0", "checkpoint.every_minutes=0", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if result.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    records = [json.loads(line) for line in (root / name / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["Speed/img_per_s"] for r in records if "Speed/img_per_s" in r][1:]
    return statistics.mean(speeds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--batch", type=int, default=64, help="per process")
    args = parser.parse_args()
    from gan_dist.data.prepare import write_shards
    from gan_dist.data.sources import digits

    print("| config | batch per process | 1 process img/s | 2 processes img/s | ratio | efficiency |\n"
          "|---|---|---|---|---|---|", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs:
            config, resolution, extra = CONFIGS[name]
            data = write_shards(digits(resolution), Path(tmp) / f"digits{resolution}", shard_size=256)
            one, two = [], []
            for _ in range(args.repeats):
                one.append(run(config, data, Path(tmp) / "runs", 1, args.batch, args.steps, extra))
                two.append(run(config, data, Path(tmp) / "runs", 2, args.batch, args.steps, extra))
            ratio = statistics.median(two) / statistics.median(one)
            print(f"| {name} | {args.batch} | {statistics.median(one):.0f} | {statistics.median(two):.0f} | "
                  f"{ratio:.2f} | {ratio / 2:.2f} |", flush=True)


if __name__ == "__main__":
    main()
