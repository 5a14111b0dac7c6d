"""Peak memory of building an evaluation reference: 50k of a 200k-sample dataset, before and after.

    python bench/reference_memory.py [--count 200000] [--reference 50000] [--before REV] [--work DIR]

Writes a dataset of `--count` random 3x32x32 images (CIFAR-sized, in a seeded random order),
then, in a fresh process per variant, builds the reference features of `--reference` of them
with a small feature extractor (4x4 average pooling: 48 features) and reports the process's
peak RSS (ru_maxrss) and the wall time. "before" runs the code of git revision REV (a
temporary worktree; default: the commit before the read-once planner), which listed every
record of the rank's shards, images included, before keeping the first N; "after" runs this
checkout, which reads only the selected samples and keeps only their features. Each code
also builds a reference of one batch (250); the new code's peak for that is the process's
own (torch's libraries alone are about 500 MiB of RSS here), and each row is also given
above it: what the reference costs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEFORE = "378c3c3"

CHILD = r"""
import json, resource, sys, time
import torch
from gan_dist.eval import collect
assert collect.__file__.startswith(sys.argv[3]), collect.__file__
from gan_dist.data.stream import open_dataset

info = open_dataset(sys.argv[1])
num = int(sys.argv[2])
extract = lambda x: {"features": torch.nn.functional.avg_pool2d(x.float(), 8).flatten(1)}
start = time.perf_counter()
if hasattr(collect, "reference_selection"):
    features = collect.real(info, collect.reference_selection(info, num, 0), 250, 0, 1, "cpu", extract)
else:
    features = collect.real(info, lambda i: i < num, 250, 0, 1, "cpu", extract)
seconds = time.perf_counter() - start
print(json.dumps({"rows": len(features["features"]), "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "seconds": seconds}))
"""


def dataset(work: Path, count: int) -> Path:
    out = work / f"random-{count}"
    if not (out / "index.json").is_file():
        import numpy as np

        from gan_dist.data.prepare import write_shards
        from gan_dist.data.sources import ArraySource

        images = np.random.default_rng(0).integers(0, 256, size=(count, 3, 32, 32), dtype=np.uint8)
        labels = np.arange(count) % 10
        write_shards(ArraySource(images, labels, [str(c) for c in range(10)], "random"), out, workers=2)
    return out


def measure(source_root: Path, data: Path, num: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(source_root), "OMP_NUM_THREADS": "1"}
    # Run from the source root: `python -c` puts the working directory first on sys.path.
    result = subprocess.run([sys.executable, "-c", CHILD, str(data.resolve()), str(num), str(source_root)], env=env,
                            cwd=source_root, capture_output=True, text=True, check=False)
    if result.returncode:
        sys.exit(f"measuring {source_root} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=200_000)
    parser.add_argument("--reference", type=int, default=50_000)
    parser.add_argument("--before", default=BEFORE)
    parser.add_argument("--work", type=Path, default=Path("runs/reference_memory"))
    args = parser.parse_args()
    data = dataset(args.work, args.count)
    size_mib = sum(p.stat().st_size for p in data.glob("*.tar")) / 2**20
    with tempfile.TemporaryDirectory() as tmp:
        worktree = Path(tmp) / "before"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(worktree), args.before],
                       check=True, capture_output=True)
        try:
            rows = {(name, num): measure(source, data, num) for name, source in (("before", worktree), ("after", ROOT))
                    for num in (250, args.reference)}
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(worktree)], check=False)
    print(f"reference of {args.reference} from {args.count} samples of 3x32x32 ({size_mib:.0f} MiB of shards)\n")
    own = rows[("after", 250)]["peak_rss_mib"]
    print(f"| code | reference | peak RSS | above the process's own ({own:.0f} MiB) | time |\n|---|---|---|---|---|")
    for (name, num), row in rows.items():
        label = f"before ({args.before})" if name == "before" else "after"
        extra = row["peak_rss_mib"] - own
        print(f"| {label} | {row['rows']} | {row['peak_rss_mib']:.0f} MiB | {extra:+.0f} MiB | {row['seconds']:.1f} s |")


if __name__ == "__main__":
    main()
