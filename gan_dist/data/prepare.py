"""`gan-dist prepare`: turn a dataset into webdataset tar shards plus index.json.

Each sample is `<key>.npy` (uint8 CHW image, or float32 point for the 2-D mixtures) and
`<key>.cls` (integer label). The shards are written into a temporary directory that is
renamed into place at the end, so an interrupted prepare never leaves half a dataset.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gan_dist.errors import UserError

INDEX_FORMAT = "gan_dist.shards/1"
MAX_SHARD_SIZE = 10_000


def auto_shard_size(count: int) -> int:
    """At least 8 shards (so ranks and workers start on different shards), at most 10,000
    samples each, and all of nearly equal size: shards are resampled uniformly, so a small
    last shard would have its samples drawn far more often than the others."""
    num_shards = max(8, math.ceil(count / MAX_SHARD_SIZE))
    return max(1, math.ceil(count / num_shards))


@dataclass
class Arrays:
    """A whole small dataset in memory: samples [N, ...], labels [N], class names."""

    samples: np.ndarray
    labels: np.ndarray
    classes: list[str]
    source: str


def _resize_uint8(images: np.ndarray, resolution: int) -> np.ndarray:
    """Resize [N, C, H, W] uint8 images with PIL's bicubic filter (the usual choice for FID)."""
    from PIL import Image

    out = np.empty((len(images), images.shape[1], resolution, resolution), dtype=np.uint8)
    for i, img in enumerate(images):
        for c, channel in enumerate(img):
            pil = Image.fromarray(channel).resize((resolution, resolution), Image.BICUBIC)
            out[i, c] = np.asarray(pil)
    return out


def load_digits_arrays(resolution: int = 0) -> Arrays:
    """scikit-learn's bundled 8x8 digits (1,797 images, values 0..16) as uint8 0..255."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    if resolution:
        images = _resize_uint8(images, resolution)
    classes = [str(c) for c in bunch.target_names]
    return Arrays(images, bunch.target.astype(np.int64), classes, "sklearn digits")


def load_mixture_arrays(name: str) -> Arrays:
    from gan_dist.data.toy import sample_mixture

    points, labels = sample_mixture(name)
    classes = [f"mode{i}" for i in range(int(labels.max()) + 1)]
    return Arrays(points, labels, classes, f"{name} Gaussian mixture (PacGAN protocol)")


TORCHVISION_SETS = {"mnist": "MNIST", "fashionmnist": "FashionMNIST"}


def load_torchvision_arrays(name: str, root: str, split: str, resolution: int = 0,
                            download: bool = False) -> Arrays:
    """MNIST/FashionMNIST from torchvision's files under ROOT/<Name>/raw."""
    key = name.lower()
    if key not in TORCHVISION_SETS:
        raise UserError(f"unknown torchvision dataset '{name}'; choose one of: MNIST, FashionMNIST")
    if not root:
        raise UserError(f"{name} needs the directory with torchvision's files: pass --root DIR "
                        f"(or set data.root=DIR) so that DIR/{TORCHVISION_SETS[key]}/raw holds them")
    import torchvision

    cls = getattr(torchvision.datasets, TORCHVISION_SETS[key])
    try:
        ds = cls(root, train=(split == "train"), download=download)
    except RuntimeError as err:
        raise UserError(f"{TORCHVISION_SETS[key]} files not found under {root}/{TORCHVISION_SETS[key]}/raw "
                        f"({str(err).splitlines()[0]}); copy the raw files there or allow --download") from err
    images = ds.data.numpy().astype(np.uint8)[:, None]
    if resolution:
        images = _resize_uint8(images, resolution)
    return Arrays(images, ds.targets.numpy().astype(np.int64), list(ds.classes),
                  f"torchvision {TORCHVISION_SETS[key]} {split}")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_shard(path: Path, arrays: Arrays, start: int, stop: int) -> dict:
    import webdataset as wds

    # A fixed mtime makes the same data give the same bytes, hence the same sha256.
    with wds.TarWriter(str(path), mtime=0) as sink:
        for i in range(start, stop):
            sink.write({"__key__": f"{i:08d}", "npy": np.ascontiguousarray(arrays.samples[i]),
                        "cls": int(arrays.labels[i])})
    return {"name": path.name, "count": stop - start, "sha256": _sha256(path)}


def write_shards(arrays: Arrays, out: str | Path, shard_size: int = 0, force: bool = False) -> Path:
    """Write `arrays` as shards + index.json into `out`, atomically (shard_size 0: automatic)."""
    out = Path(out)
    if shard_size < 0:
        raise UserError(f"--shard-size must be > 0 (or 0 for automatic), got {shard_size}")
    shard_size = shard_size or auto_shard_size(len(arrays.samples))
    if out.exists() and not force:
        raise UserError(f"{out} already exists; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    count = len(arrays.samples)
    shards = [_write_shard(tmp / f"shard-{n:06d}.tar", arrays, start, min(start + shard_size, count))
              for n, start in enumerate(range(0, count, shard_size))]
    index = {"format": INDEX_FORMAT, "source": arrays.source, "count": count,
             "shape": list(arrays.samples.shape[1:]), "dtype": str(arrays.samples.dtype),
             "classes": arrays.classes, "shards": shards}
    (tmp / "index.json").write_text(json.dumps(index, indent=1))
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)
    return out


def load_source(source: str, name: str = "", root: str = "", split: str = "train",
                resolution: int = 0, download: bool = False) -> Arrays:
    """The arrays of a built-in source by its name."""
    if source == "digits":
        return load_digits_arrays(resolution)
    if source in ("ring8", "grid25"):
        if resolution:
            raise UserError(f"--resolution does not apply to the 2-D points of {source}")
        return load_mixture_arrays(source)
    if source == "torchvision":
        return load_torchvision_arrays(name, root, split, resolution, download)
    if source in TORCHVISION_SETS:
        return load_torchvision_arrays(source, root, split, resolution, download)
    raise UserError(f"unknown dataset source '{source}'; choose one of: digits, ring8, grid25, "
                    "torchvision MNIST|FashionMNIST")


BUILTIN_DATASETS = ("digits", "ring8", "grid25", *TORCHVISION_SETS)


def add_arguments(parser) -> None:
    parser.add_argument("source", help="digits | ring8 | grid25 | torchvision")
    parser.add_argument("name", nargs="?", default="", help="for torchvision: MNIST or FashionMNIST")
    parser.add_argument("--out", required=True, help="output directory (shards + index.json)")
    parser.add_argument("--root", default="", help="torchvision: directory holding <Name>/raw/")
    parser.add_argument("--split", default="train", choices=["train", "test"])
    parser.add_argument("--resolution", type=int, default=0, help="resize images to NxN (bicubic)")
    parser.add_argument("--limit", type=int, default=0, help="keep only the first N samples (0 = all)")
    parser.add_argument("--shard-size", type=int, default=0,
                        help="samples per shard (default: at least 8 shards, at most 10,000 samples each)")
    parser.add_argument("--download", action="store_true", help="let torchvision download (needs internet)")
    parser.add_argument("--force", action="store_true", help="replace an existing output directory")


def run(args) -> int:
    # Checked here too so that a refusal comes before the (possibly slow) loading of the source.
    if Path(args.out).exists() and not args.force:
        raise UserError(f"{args.out} already exists; pass --force to replace it")
    arrays = load_source(args.source, args.name, args.root, args.split, args.resolution, args.download)
    if args.limit > 0:
        arrays = Arrays(arrays.samples[: args.limit], arrays.labels[: args.limit], arrays.classes, arrays.source)
    out = write_shards(arrays, args.out, args.shard_size, args.force)
    print(f"wrote {len(arrays.samples)} samples of shape {list(arrays.samples.shape[1:])} to {out}")
    return 0
