"""A user's own small folder: does the recipe collapse? (docs/results.md, issue 24)

    python bench/own_images.py [--root runs/own_images] [--minutes 10] [--parallel 2] [--runs own,dcgan,noada]

Builds a folder of 1,000 images of simple shapes, 48 px, one class folder per shape (discs
and squares of random colours, sizes and places on random backgrounds), prepares it at 32 px
with `gan-dist prepare imagefolder`, and trains each recipe for `--minutes` of wall time
(stopped with SIGTERM, as a cluster would), with a checkpoint every minute:
- own: configs/own_images.yaml (r3gan, relativistic + R1 + R2, ADA);
- dcgan: the DCGAN CPU recipe (configs/dcgan_mnist32_cpu.yaml) on the same folder, as the
  docs suggested before this recipe existed;
- noada: configs/own_images.yaml without ADA.

Every checkpoint is scored with `gan-dist eval --metrics cls --num 1000` (a classifier trained
on the folder's two classes): the class shares of the samples and the spread of their
classifier features against the real images' (spread_ratio). A run has collapsed when, at
any checkpoint after 2 minutes, a class share is outside 35-65% or the spread is below 70% of
the data's. Prints p (ADA's augmentation probability) and both measures per checkpoint, then
the verdicts.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {
    "own": ("own_images.yaml", []),
    "dcgan": ("dcgan_mnist32_cpu.yaml", ["data.dataset=", "model.conditional=false"]),
    "noada": ("own_images.yaml", ["data.augment=", "data.ada_kimg=0"]),
}
SHARE_RANGE, MIN_SPREAD, AFTER_MINUTES = (0.35, 0.65), 0.70, 2.0


def make_shapes(folder: Path, count: int = 1000, size: int = 48, seed: int = 0) -> None:
    """Discs and squares, half each, in class folders (sorted by class, as users keep them)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    for i in range(count):
        shape = ("disc", "square")[i % 2]
        background = tuple(int(v) for v in rng.integers(0, 120, 3))
        colour = tuple(int(v) for v in rng.integers(120, 256, 3))
        image = Image.new("RGB", (size, size), background)
        radius = rng.uniform(0.15, 0.3) * size
        cx, cy = rng.uniform(radius, size - radius, 2)
        box = (cx - radius, cy - radius, cx + radius, cy + radius)
        draw = ImageDraw.Draw(image)
        (draw.ellipse if shape == "disc" else draw.rectangle)(box, fill=colour)
        (folder / shape).mkdir(parents=True, exist_ok=True)
        image.save(folder / shape / f"{i:05d}.png")


def _run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, check=False, **kwargs)
    if result.returncode:
        sys.exit(f"{' '.join(command[:4])} ... failed:\n{result.stderr[-3000:]}")
    return result


def train(name: str, data: Path, root: Path, minutes: float, extra: list[str]) -> None:
    """Train for `minutes` of wall time, then SIGTERM: the run checkpoints and stops."""
    config, overrides = RECIPES[name]
    command = [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / config),
               f"data.path={data}", f"run.root={root}", f"run.name={name}", "run.overwrite=true", "train.resume=none",
               "train.total_kimg=100000", "checkpoint.every_minutes=1", "checkpoint.every_kimg=0",
               "checkpoint.keep_last=0", "train.num_threads=1", *overrides, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = root / f"{name}.log"  # a file, not a pipe: nobody reads a pipe during the run, and a full one blocks
    root.mkdir(parents=True, exist_ok=True)
    with log.open("w") as err:
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=err, text=True)
        try:
            process.wait(timeout=minutes * 60)
            sys.exit(f"{name} ended before {minutes} minutes:\n{log.read_text()[-3000:]}")
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=300)


def score(run_dir: Path) -> list[dict]:
    """Per checkpoint: minutes of training, kimg, p, class shares and spread ratio."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    table = []
    for checkpoint in sorted((run_dir / "checkpoints").glob("step_*")):
        state = json.loads((checkpoint / "state.json").read_text())
        step = state["progress"]["step"]
        result = _run([sys.executable, "-m", "gan_dist.cli", "eval", "--run", str(run_dir), "--step", str(step),
                       "--metrics", "cls", "--num", "1000", "--json"])
        cls = json.loads(result.stdout)["results"]["cls"]
        logged = [r for r in rows if r.get("step", 0) <= step and "Augment/p" in r]
        table.append({"step": step, "minutes": state["elapsed_s"] / 60, "kimg": step * _batch(state) / 1000,
                      "p": logged[-1]["Augment/p"] if logged else None, "shares": cls["class_fractions"],
                      "spread": cls["spread_ratio"], "raw_spread": cls["raw_spread_ratio"]})
    return table


def calibrate(data: Path) -> dict[str, float]:
    """What the spread measure reads for real images that lost nothing but sharpness or
    contrast, and for ones that lost a class: with `cls`'s own cached classifier, on the
    held-out real images (raw: the distance before the features are scaled to length 1)."""
    import torch
    from PIL import Image, ImageFilter

    from gan_dist.data.index import open_dataset
    from gan_dist.eval import classifier, collect, run, scores

    info = open_dataset(str(data))
    path = run.cache_dir(run.EvalOptions()) / f"{collect.dataset_key(info)}-classifier-{classifier.ARCHITECTURE}.safetensors"
    model = classifier.load(path)
    real = collect.real(info, collect.reference_selection(info, info.count, 0), 256, 0, 1, torch.device("cpu"), None)
    held = torch.from_numpy(classifier.held_out(real["index"].numpy()))
    images, labels = real["samples"][held], real["labels"][held]

    def blur(radius: float) -> torch.Tensor:
        arrays = [np.asarray(Image.fromarray(x.permute(1, 2, 0).numpy()).filter(ImageFilter.GaussianBlur(radius)))
                  for x in images]
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()

    faded = (images.float() * 0.7 + images.float().mean() * 0.3).to(torch.uint8)
    sets = {"held-out real": images, "blurred 1 px": blur(1.0), "blurred 2 px": blur(2.0), "contrast 70%": faded,
            "one class only": images[labels == labels[0]]}
    with torch.no_grad():
        features = {name: model(x)["features"] for name, x in sets.items()}
    out = {}
    for name, f in features.items():
        out[name] = tuple(scores.mean_pairwise_distance(f, unit=unit) /
                          scores.mean_pairwise_distance(features["held-out real"], unit=unit) for unit in (True, False))
    return out


def _batch(state: dict) -> int:
    return state["config"]["train"]["batch_size"] * state["config"]["train"]["n_critic"]


def collapsed(table: list[dict]) -> list[str]:
    """Why the run collapsed (empty: it did not), from its checkpoints after AFTER_MINUTES."""
    reasons = []
    for row in table:
        if row["minutes"] < AFTER_MINUTES:
            continue
        low, high = SHARE_RANGE
        if not all(low <= share <= high for share in row["shares"]):
            reasons.append(f"{row['minutes']:.1f} min: class shares {_shares(row)}")
        if row["spread"] < MIN_SPREAD:
            reasons.append(f"{row['minutes']:.1f} min: spread {row['spread']:.0%} of the data's")
    return reasons


def _shares(row: dict) -> str:
    return "/".join(f"{share:.0%}" for share in row["shares"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="runs/own_images")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--runs", default="own,dcgan,noada")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every run")
    args = parser.parse_args()
    root = Path(args.root).resolve()
    folder, data = root / "shapes", root / "data"
    if not (data / "index.json").is_file():
        make_shapes(folder)
        _run([sys.executable, "-m", "gan_dist.cli", "prepare", "imagefolder", str(folder), "--out", str(data),
              "--resolution", "32", "--force"])
    names = args.runs.split(",")
    start = time.perf_counter()
    with ThreadPoolExecutor(args.parallel) as pool:
        list(pool.map(lambda n: train(n, data, root / "runs", args.minutes, args.overrides), names))
    print(f"trained {len(names)} runs of {args.minutes} min in {(time.perf_counter() - start) / 60:.1f} min, "
          f"{args.parallel} at a time, one thread each\n")
    print("| run | checkpoint | minutes | kimg | ADA p | class shares | spread vs data | raw spread |")
    print("|---|---|---|---|---|---|---|---|")
    verdicts = {}
    for name in names:
        table = score(root / "runs" / name)
        for row in table:
            p = "-" if row["p"] is None else f"{row['p']:.3f}"
            print(f"| {name} | {row['step']} | {row['minutes']:.1f} | {row['kimg']:.1f} | {p} | {_shares(row)} | "
                  f"{row['spread']:.0%} | {row['raw_spread']:.0%} |", flush=True)
        verdicts[name] = collapsed(table)
    print("\nthe measure on real images (held-out tenth):\n\n| real images | spread vs data | raw spread |\n|---|---|---|")
    for name, (unit, raw) in calibrate(data).items():
        print(f"| {name} | {unit:.0%} | {raw:.0%} |")
    print()
    for name, reasons in verdicts.items():
        print(f"{name}: " + ("collapsed (" + "; ".join(reasons[:3]) + ")" if reasons else "did not collapse"))


if __name__ == "__main__":
    main()
