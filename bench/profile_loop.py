"""Host synchronisations in the training loop, counted with torch.profiler (CPU, 1 process).

    python bench/profile_loop.py [--steps 200] [--log-every 50] [--trace bench/results/profile_cpu.json.gz]

Rows for fused Adam in fp32 and in fp16 (one grad scaler per network, on a CPU too), and
for foreach Adam, the negative control.

Trains configs/tiny.yaml (non-saturating loss + R1, the 8x8 digits) in this process under the
profiler and counts `aten::_local_scalar_dense`, the op behind every `.item()`, `float(t)` and
`bool(t)` on a tensor: each is a point where the host waits for the device. The trainer keeps
statistics and the skip decision on the device, so the count grows with the number of log
lines, not with the number of steps. Prints a table, and writes the Chrome trace of a short
extra run (10 steps, gzipped; open it in Perfetto or chrome://tracing).
"""

from __future__ import annotations

import argparse
import gzip
import shutil
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SYNC_OP = "aten::_local_scalar_dense"


def count_syncs(steps: int, log_every: int, data_path: str, trace: Path | None = None,
                extra: tuple[str, ...] = ()) -> dict[str, int]:
    """`aten::_local_scalar_dense` calls over a whole `train()` of `steps` steps, start-up included:
    {"loop": those outside the optimizers, "optimizer": those inside torch's Adam.step}.

    torch's Adam reads its step counters with `.item()`; they live on the host by design
    (fused CUDA kernels keep them on the device instead), so those reads are no host-device
    synchronisation on a GPU and are counted apart."""
    from torch.profiler import ProfilerActivity, profile

    from gan_dist.train import train

    with tempfile.TemporaryDirectory() as root:
        overrides = [f"data.path={data_path}", f"run.root={root}", "run.overwrite=true", "train.resume=none",
                     f"train.max_steps={steps}", f"log.every_steps={log_every}", "data.num_workers=0",
                     "loss.r1_gamma=1", "loss.r1_interval=4", "train.total_kimg=1000", "log.sample_every_kimg=1000",
                     "checkpoint.every_kimg=0", "checkpoint.every_minutes=0", *extra]
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            train(str(ROOT / "configs" / "tiny.yaml"), overrides)
    if trace is not None:
        trace.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(trace))
    counts = {"loop": 0, "optimizer": 0}
    for event in prof.events():
        if event.name == SYNC_OP:
            parent = event.cpu_parent
            while parent is not None and not parent.name.startswith("Optimizer.step"):
                parent = parent.cpu_parent
            counts["optimizer" if parent is not None else "loop"] += 1
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--trace", type=Path, default=Path("bench/results/profile_cpu.json.gz"))
    args = parser.parse_args()
    from gan_dist.data.prepare import write_shards
    from gan_dist.data.sources import digits

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        data = write_shards(digits(), Path(tmp) / "digits", shard_size=256)
        print("| optimizer | precision | steps | log every | host syncs in the loop | "
              "reads of Adam's host-side step counters |\n|---|---|---|---|---|---|")
        for fused, precision in (("true", "no"), ("true", "fp16"), ("false", "no")):
            for steps in (args.steps, 2 * args.steps):
                count = count_syncs(steps, args.log_every, str(data), None,
                                    (f"optim.fused={fused}", f"train.mixed_precision={precision}"))
                print(f"| {'fused' if fused == 'true' else 'foreach'} | {precision} | {steps} | {args.log_every} | "
                      f"{count['loop']} | {count['optimizer']} |", flush=True)
        raw = Path(tmp) / "trace.json"
        count_syncs(10, 5, str(data), raw)
        args.trace.parent.mkdir(parents=True, exist_ok=True)
        with open(raw, "rb") as source, gzip.open(args.trace, "wb") as sink:
            shutil.copyfileobj(source, sink)
    print(f"\ntrace of a 10-step fused run: {args.trace}")


if __name__ == "__main__":
    main()
