"""Does an unconditional GAN see every class in turn? Class shares of samples along a run,
for an image folder of class subfolders prepared shuffled (the default) and in source order.

    python bench/class_balance.py --mnist-root DIR [--root runs/class_balance] [--kimg 150] [--num 10000]

MNIST's training images (torchvision's raw files under DIR/MNIST/raw) are written as PNG
files into one folder per class, as users keep their images, then prepared twice at 32 px:
`gan-dist prepare imagefolder` (seeded shuffle) and `... --order source` (the class-sorted
order earlier versions wrote). configs/dcgan_mnist32_cpu.yaml trains on each, unconditionally
(model.conditional=false), both at once (one thread each), with a checkpoint every tenth of
the run. At each checkpoint, `--num` G_ema samples are classified by one classifier
(gan_dist.eval.classifier, trained on the shuffled data) and the total-variation distance
between their class shares and the data's is printed:

    TV = 1/2 * sum over classes |share in samples - share in data|

Exit code 0 when the shuffled run's TV is <= 0.05 at every checkpoint after the first 10% of
the run and the source-order run's exceeds 0.05 at some checkpoint; 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 0.05


def image_folder(mnist_root: str, folder: Path) -> None:
    import torchvision
    from PIL import Image

    if (folder / "class9").is_dir():
        return
    data = torchvision.datasets.MNIST(mnist_root, train=True, download=False)
    for i, (image, label) in enumerate(zip(data.data.numpy(), data.targets.tolist())):
        (folder / f"class{label}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"class{label}" / f"{i:05d}.png")


def prepare(folder: Path, out: Path, *flags: str) -> None:
    if (out / "index.json").is_file():
        return
    subprocess.run([sys.executable, "-m", "gan_dist.cli", "prepare", "imagefolder", str(folder), "--out", str(out),
                    "--resolution", "32", "--channels", "1", "--workers", "2", *flags], check=True)


def train(data: Path, root: Path, name: str, kimg: float) -> None:
    command = [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "dcgan_mnist32_cpu.yaml"),
               f"data.path={data}", "model.conditional=false", f"run.root={root}", f"run.name={name}",
               "run.overwrite=true", f"train.total_kimg={kimg}", f"checkpoint.every_kimg={kimg / 10}",
               "checkpoint.keep_last=0", f"log.sample_every_kimg={kimg / 5}"]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode:
        sys.exit(f"training {name} failed:\n{result.stderr[-3000:]}")


def classifier(data: Path):
    from gan_dist.data.index import open_dataset
    from gan_dist.eval import classifier as cls_mod
    from gan_dist.eval import collect

    info = open_dataset(str(data))
    real = collect.real(info, collect.reference_selection(info, 0, 0), 1000, 0, 1, "cpu", None)
    held_out = torch.from_numpy(cls_mod.held_out(real["index"].numpy()))
    model = cls_mod.train_classifier(real["samples"][~held_out], real["labels"][~held_out], info.num_classes)
    accuracy = cls_mod.accuracy(model, real["samples"][held_out], real["labels"][held_out])
    print(f"classifier: {100 * accuracy:.1f}% held-out accuracy", flush=True)
    return model, np.sum(info.class_counts, axis=0) / info.count


@torch.no_grad()
def class_shares(checkpoint: Path, model, num: int) -> np.ndarray:
    from gan_dist.checkpoint import load_generator
    from gan_dist.visual import to_uint8

    G, meta = load_generator(checkpoint)
    latent_dim = meta["model"]["latent_dim"]
    counts = np.zeros(10)
    gen = torch.Generator().manual_seed(0)
    for start in range(0, num, 500):
        z = torch.randn(min(500, num - start), latent_dim, generator=gen)
        predicted = model(to_uint8(G(z, None)))["logits"].argmax(1)
        counts += np.bincount(predicted.numpy(), minlength=10)
    return counts / counts.sum()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mnist-root", required=True)
    parser.add_argument("--root", type=Path, default=Path("runs/class_balance"))
    parser.add_argument("--kimg", type=float, default=150)
    parser.add_argument("--num", type=int, default=10_000)
    args = parser.parse_args()
    folder = args.root / "mnist-folder"
    image_folder(args.mnist_root, folder)
    data = {"shuffled": args.root / "data-shuffled", "source": args.root / "data-source"}
    prepare(folder, data["shuffled"])
    prepare(folder, data["source"], "--order", "source")
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda order: train(data[order], args.root, order, args.kimg), data))
    model, data_shares = classifier(data["shuffled"])
    print("| kimg | TV shuffled | TV source order |\n|---|---|---|")
    worst = {"shuffled": 0.0, "source": 0.0}
    steps = sorted(p.name for p in (args.root / "shuffled" / "checkpoints").glob("step_*"))
    for step in steps:
        row = {}
        for order in data:
            checkpoint = args.root / order / "checkpoints" / step
            state = json.loads((checkpoint / "state.json").read_text())
            kimg = state["progress"]["num_d_steps"] * state["config"]["train"]["batch_size"] / 1000
            row[order] = 0.5 * float(np.abs(class_shares(checkpoint, model, args.num) - data_shares).sum())
            if kimg > 0.1 * args.kimg + 1e-6:
                worst[order] = max(worst[order], row[order])
        print(f"| {kimg:.0f} | {row['shuffled']:.3f} | {row['source']:.3f} |", flush=True)
    passed = worst["shuffled"] <= LIMIT < worst["source"]
    print(f"\nafter the first 10%: worst TV {worst['shuffled']:.3f} shuffled, {worst['source']:.3f} source order "
          f"({'pass' if passed else 'FAIL'}: shuffled <= {LIMIT} < source order)")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
