"""Where `gan-dist prepare` reads samples from: built-in sets, torchvision, an image folder.

A source is indexable: `len(source)`, `source.load(i) -> (array, label)`, plus `shape`,
`dtype`, `classes` and `description`. Loading one sample at a time lets the writer encode
shards in parallel worker processes without holding a large image folder in memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gan_dist.data.samples import BadSample
from gan_dist.errors import UserError


@dataclass
class ArraySource:
    """A whole small dataset in memory: samples [N, ...], labels [N], class names."""

    samples: np.ndarray
    labels: np.ndarray
    classes: list[str]
    description: str

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.samples.shape[1:])

    @property
    def dtype(self) -> str:
        return str(self.samples.dtype)

    def load(self, i: int) -> tuple[np.ndarray, int]:
        return self.samples[i], int(self.labels[i])

    def name_of(self, i: int) -> str:
        return f"sample {i}"


def parse_resolution(text: str) -> int | tuple[int, int]:
    """'N' or 'HxW' (height first: 32x64 is 32 tall and 64 wide); '0' keeps the native size."""
    parts = text.lower().split("x")
    if len(parts) in (1, 2) and all(p.strip().isdigit() for p in parts):
        sizes = [int(p) for p in parts]
        if len(sizes) == 1 or sizes[0] == sizes[1]:
            return sizes[0]
        if min(sizes) > 0:
            return sizes[0], sizes[1]
    raise UserError(f"--resolution {text}: give N for N x N pixels or HxW, height first (e.g. 32x64), both > 0")


def _height_width(resolution) -> tuple[int, int]:
    return resolution if isinstance(resolution, tuple) else (resolution, resolution)


def _resize_crop(pil, resolution):
    """Resize (bicubic, the usual choice for FID) until the image covers the target size, then
    centre-crop to it: for a square target, the shorter side becomes N."""
    from PIL import Image

    height, width = _height_width(resolution)
    w, h = pil.size
    scale = max(width / w, height / h)
    new_w, new_h = max(width, round(w * scale)), max(height, round(h * scale))
    pil = pil.resize((new_w, new_h), Image.BICUBIC)
    left, top = (new_w - width) // 2, (new_h - height) // 2
    return pil.crop((left, top, left + width, top + height))


def _resize_arrays(images: np.ndarray, resolution) -> np.ndarray:
    from PIL import Image

    out = np.empty((len(images), images.shape[1], *_height_width(resolution)), dtype=np.uint8)
    for i, img in enumerate(images):
        pil = Image.fromarray(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0))
        resized = np.asarray(_resize_crop(pil, resolution))
        out[i] = resized[None] if resized.ndim == 2 else resized.transpose(2, 0, 1)
    return out


def digits(resolution: int = 0) -> ArraySource:
    """scikit-learn's bundled 8x8 digits (1,797 images, values 0..16) as uint8 0..255."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    if resolution:
        images = _resize_arrays(images, resolution)
    classes = [str(c) for c in bunch.target_names]
    return ArraySource(images, bunch.target.astype(np.int64), classes, "sklearn digits")


def mixture(name: str) -> ArraySource:
    from gan_dist.data.toy import sample_mixture

    points, labels = sample_mixture(name)
    classes = [f"mode{i}" for i in range(int(labels.max()) + 1)]
    return ArraySource(points, labels, classes, f"{name} Gaussian mixture (PacGAN protocol)")


TORCHVISION_SETS = {"mnist": "MNIST", "fashionmnist": "FashionMNIST", "cifar10": "CIFAR10"}


def torchvision_set(name: str, root: str, split: str, resolution: int = 0, download: bool = True,
                    root_setting: str = "--root DIR") -> ArraySource:
    """MNIST, FashionMNIST or CIFAR10 from torchvision's files under ROOT (downloaded if allowed).
    `root_setting` is how the caller's user sets ROOT (prepare's flag, or training's config key)."""
    key = name.lower()
    if key not in TORCHVISION_SETS:
        raise UserError(f"unknown torchvision dataset '{name}'; choose one of: {', '.join(TORCHVISION_SETS.values())}")
    tv_name = TORCHVISION_SETS[key]
    where = f"{root}/{tv_name}/raw" if key != "cifar10" else f"{root}/cifar-10-batches-py"
    if not root:
        raise UserError(f"{tv_name} needs the directory with torchvision's files: pass {root_setting}; "
                        f"torchvision keeps them in DIR/{where.split('/', 1)[1]}")
    import torchvision

    cls = getattr(torchvision.datasets, tv_name)
    try:
        ds = cls(root, train=(split == "train"), download=False)
    except RuntimeError as missing:
        if not download:
            raise UserError(f"{tv_name} files not found under {where} ({str(missing).splitlines()[0]}); "
                            "copy torchvision's files there, or drop --no-download when online") from missing
        try:
            ds = cls(root, train=(split == "train"), download=True)
        except Exception as err:  # offline: URLError, OSError, checksum failures
            raise UserError(f"{tv_name} files not found under {where}, and downloading them failed "
                            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                            "copy torchvision's files there when offline") from err
    data = np.asarray(ds.data, dtype=np.uint8)
    images = data[:, None] if data.ndim == 3 else data.transpose(0, 3, 1, 2)  # NHW or NHWC -> NCHW
    if resolution:
        images = _resize_arrays(images, resolution)
    labels = np.asarray(ds.targets, dtype=np.int64)
    return ArraySource(np.ascontiguousarray(images), labels, list(ds.classes), f"torchvision {tv_name} {split}")


class SizeMismatch(BadSample):
    """An image whose size differs from the dataset's, with no --resolution to fix it."""


class ImageFolder:
    """Every file under ROOT that PIL can read; first-level subfolders are the classes.

    Without subfolders the images are unlabelled (label 0, no classes). Files PIL cannot
    read are skipped and listed by the writer.
    """

    def __init__(self, root: str, resolution: int | tuple[int, int] = 0, channels: int = 3):
        self.root = Path(root)
        if not self.root.is_dir():
            raise UserError(f"imagefolder: {root} is not a directory")
        if channels not in (1, 3):
            raise UserError(f"--channels must be 1 or 3, got {channels}")
        self.files = sorted(p for p in self.root.rglob("*") if p.is_file() and not p.name.startswith("."))
        if not self.files:
            raise UserError(f"imagefolder: {root} holds no files")
        in_subfolders = [p for p in self.files if len(p.relative_to(self.root).parts) > 1]
        self.classes = sorted({p.relative_to(self.root).parts[0] for p in in_subfolders})
        self.ignored = []
        if self.classes:  # loose files beside the class folders have no label
            self.ignored = [{"file": p.name, "reason": "outside the class folders (no label)"}
                            for p in self.files if len(p.relative_to(self.root).parts) == 1]
            self.files = in_subfolders
        self.class_index = {name: i for i, name in enumerate(self.classes)}
        self.resolution, self.channels = resolution, channels
        self.description = f"image folder {self.root.name} ({len(self.classes) or 'no'} classes)"
        self.shape = (channels, *_height_width(resolution)) if resolution else self._first_shape()
        self.dtype = "uint8"

    def _first_shape(self) -> tuple[int, ...]:
        from PIL import Image

        for path in self.files:
            try:
                with Image.open(path) as pil:
                    return (self.channels, pil.size[1], pil.size[0])
            except Exception:  # noqa: BLE001, S112 - unreadable files are reported when the shard is written
                continue
        raise UserError(f"imagefolder: no file under {self.root} is an image PIL can read")

    def __len__(self) -> int:
        return len(self.files)

    def name_of(self, i: int) -> str:
        return str(self.files[i].relative_to(self.root))

    def load(self, i: int) -> tuple[np.ndarray, int]:
        from PIL import Image

        path = self.files[i]
        try:
            with Image.open(path) as pil:
                pil = pil.convert("L" if self.channels == 1 else "RGB")
        except Exception as err:  # PIL raises many types for non-images and truncated files
            raise BadSample(f"unreadable ({type(err).__name__}: {err})") from err
        if self.resolution:
            pil = _resize_crop(pil, self.resolution)
        array = np.asarray(pil)
        array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
        if array.shape != self.shape:
            raise SizeMismatch(f"size {array.shape[2]}x{array.shape[1]} differs from the first image's "
                               f"{self.shape[2]}x{self.shape[1]}")
        label = self.class_index[path.relative_to(self.root).parts[0]] if self.classes else 0
        return np.ascontiguousarray(array), label


def open_source(source: str, name: str = "", root: str = "", split: str = "train", resolution: int | tuple = 0,
                download: bool = True, channels: int = 3, root_setting: str = "--root DIR"):
    """A source by its command-line name (`root_setting`: how the user sets `root`, for messages)."""
    if source == "digits":
        return digits(resolution)
    if source in ("ring8", "grid25"):
        if resolution:
            raise UserError(f"--resolution does not apply to the 2-D points of {source}")
        return mixture(source)
    if source == "torchvision":
        return torchvision_set(name, root, split, resolution, download, root_setting)
    if source in TORCHVISION_SETS:
        return torchvision_set(source, root, split, resolution, download, root_setting)
    if source == "imagefolder":
        if not name:
            raise UserError("imagefolder needs the folder: gan-dist prepare imagefolder PATH --out DIR")
        return ImageFolder(name, resolution, channels)
    raise UserError(f"unknown dataset source '{source}'; choose one of: digits, ring8, grid25, "
                    "torchvision MNIST|FashionMNIST|CIFAR10, imagefolder PATH")
