"""Does an unconditional GAN see every class in turn? Class shares of samples along a run,
for an image folder of class subfolders prepared shuffled (the default) and in source order.

    python bench/class_balance.py digits [--root runs/class_balance] [--num 10000]
    python bench/class_balance.py mnist --mnist-root DIR [--kimg 150] [--root ...] [--num 10000]

The images (scikit-learn's 1,797 8x8 digits, or MNIST's 60,000 training images from
torchvision's raw files under DIR/MNIST/raw) are written as PNG files into one folder per
class, as users keep their images, then prepared twice: `gan-dist prepare imagefolder`
(seeded shuffle) and `... --order source` (the class-sorted order earlier versions wrote).
The digits train with configs/default.yaml (the quickstart: unconditional, 640 kimg); MNIST,
at 32 px, with configs/dcgan_mnist32_cpu.yaml made unconditional (model.conditional=false).
Both orders train at once (one thread each), with a checkpoint every tenth of the run. At each checkpoint, `--num` G_ema samples are classified by one classifier
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


SETS = {  # config, its overrides, prepare flags, default kimg
    "digits": ("default.yaml", [], [], 640),
    "mnist": ("dcgan_mnist32_cpu.yaml", ["model.conditional=false"], ["--resolution", "32"], 150),
}


def image_folder(source: str, mnist_root: str, folder: Path) -> None:
    from PIL import Image

    if (folder / "class9").is_dir():
        return
    if source == "digits":
        from gan_dist.data.sources import digits

        images, labels = digits().samples[:, 0], digits().labels.tolist()
    else:
        import torchvision

        data = torchvision.datasets.MNIST(mnist_root, train=True, download=False)
        images, labels = data.data.numpy(), data.targets.tolist()
    for i, (image, label) in enumerate(zip(images, labels)):
        (folder / f"class{label}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"class{label}" / f"{i:05d}.png")


def prepare(source: str, folder: Path, out: Path, *flags: str) -> None:
    if (out / "index.json").is_file():
        return
    subprocess.run([sys.executable, "-m", "gan_dist.cli", "prepare", "imagefolder", str(folder), "--out", str(out),
                    "--channels", "1", "--workers", "2", *SETS[source][2], *flags], check=True)


def train(source: str, data: Path, root: Path, name: str, kimg: float) -> None:
    config, overrides = SETS[source][:2]
    command = [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / config),
               f"data.path={data}", *overrides, f"run.root={root}", f"run.name={name}",
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
    from gan_dist.eval.collect import chunk_latents
    from gan_dist.visual import to_uint8

    G, meta = load_generator(checkpoint)
    counts = np.zeros(10)
    for chunk, start in enumerate(range(0, num, 500)):
        z = chunk_latents(chunk, min(500, num - start), meta["model"]["latent_dim"], 0)
        predicted = model(to_uint8(G(z, None)))["logits"].argmax(1)
        counts += np.bincount(predicted.numpy(), minlength=10)
    return counts / counts.sum()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", choices=sorted(SETS))
    parser.add_argument("--mnist-root", default="")
    parser.add_argument("--root", type=Path, default=Path("runs/class_balance"))
    parser.add_argument("--kimg", type=float, default=0, help="run length (default: the config's)")
    parser.add_argument("--num", type=int, default=10_000)
    args = parser.parse_args()
    if args.source == "mnist" and not args.mnist_root:
        parser.error("mnist needs --mnist-root DIR (torchvision's files under DIR/MNIST/raw)")
    if args.source == "mnist" and not (Path(args.mnist_root) / "MNIST" / "raw").is_dir():
        parser.error(f"--mnist-root {args.mnist_root}: no MNIST/raw folder in it; pass the folder that holds MNIST/")
    run_kimg = args.kimg or SETS[args.source][3]
    root = args.root / args.source
    folder = root / "folder"
    image_folder(args.source, args.mnist_root, folder)
    data = {"shuffled": root / "data-shuffled", "source": root / "data-source"}
    prepare(args.source, folder, data["shuffled"])
    prepare(args.source, folder, data["source"], "--order", "source")
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda order: train(args.source, data[order], root, order, run_kimg), data))
    model, data_shares = classifier(data["shuffled"])
    print("| kimg | TV shuffled | TV source order |\n|---|---|---|")
    worst = {"shuffled": 0.0, "source": 0.0}
    steps = sorted(p.name for p in (root / "shuffled" / "checkpoints").glob("step_*"))
    for step in steps:
        row = {}
        for order in data:
            checkpoint = root / order / "checkpoints" / step
            state = json.loads((checkpoint / "state.json").read_text())
            checkpoint_kimg = state["progress"]["num_d_steps"] * state["config"]["train"]["batch_size"] / 1000
            row[order] = 0.5 * float(np.abs(class_shares(checkpoint, model, args.num) - data_shares).sum())
            if checkpoint_kimg > 0.15 * run_kimg:  # after the checkpoint at 10%
                worst[order] = max(worst[order], row[order])
        print(f"| {checkpoint_kimg:.0f} | {row['shuffled']:.3f} | {row['source']:.3f} |", flush=True)
    passed = worst["shuffled"] <= LIMIT < worst["source"]
    print(f"\nafter the first 10%: worst TV {worst['shuffled']:.3f} shuffled, {worst['source']:.3f} source order "
          f"({'pass' if passed else 'FAIL'}: shuffled <= {LIMIT} < source order)")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
