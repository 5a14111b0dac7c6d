"""Samples on disk: how `gan-dist prepare` encodes them and how the reader checks and decodes them.

Per-sample layout: `<key>.npy` (raw uint8 CHW, or float32 points), `<key>.png` or `<key>.jpg`,
plus `<key>.cls` (the integer label as text). Chunked layout (npy only, the default): one tar
entry `<chunk key>` holds N consecutive samples as three raw arrays, `samples.npy` [N, ...],
`labels.npy` [N] int64 and `keys.npy` [N] int64 (the source indices), so a reader parses one
header and one array per N samples instead of N of each. Both decode into a `Block` of rows.

Decoding never returns rows it has not checked against the dataset's shape and dtype:
anything else is a `BadSample` with a reason and the number of samples it stands for (a
corrupt chunk counts all of its samples).
"""

from __future__ import annotations

import io

import numpy as np

FORMATS = ("npy", "png", "jpg")
IMAGE_FIELDS = ("npy", "png", "jpg", "jpeg")


CHUNK_FIELDS = ("samples.npy", "labels.npy", "keys.npy")


class BadSample(Exception):
    """Samples (`count`, usually 1) that cannot become training tensors; the message says why."""

    def __init__(self, message: str, count: int = 1):
        super().__init__(message)
        self.count = count


class Block:
    """Consecutive decoded samples as arrays: samples [n, ...], labels [n] int64, keys [n]
    (int64 source indices, or object for keys that are not numbers)."""

    __slots__ = ("keys", "labels", "samples")
    FIELDS = ("samples", "labels", "keys")  # the constructor's order

    def __init__(self, samples: np.ndarray, labels: np.ndarray, keys: np.ndarray):
        self.samples, self.labels, self.keys = samples, labels, keys

    def __len__(self) -> int:
        return len(self.labels)

    def rows(self, index) -> Block:
        """A slice or an index array of rows (a slice is a view, an index array a copy)."""
        return Block(self.samples[index], self.labels[index], self.keys[index])


def concatenate(blocks: list[Block]) -> Block:
    if len(blocks) == 1:
        return blocks[0]
    return Block(*(np.concatenate([getattr(b, name) for b in blocks]) for name in Block.FIELDS))


def _array_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def encode_chunk(key: str, samples: np.ndarray, labels: np.ndarray, keys: np.ndarray) -> dict:
    """One tar entry holding len(samples) samples (raw arrays: no per-sample header or codec)."""
    return {"__key__": key, "samples.npy": _array_bytes(samples),
            "labels.npy": _array_bytes(np.asarray(labels, dtype=np.int64)),
            "keys.npy": _array_bytes(np.asarray(keys, dtype=np.int64))}


def is_chunk(sample: dict) -> bool:
    return "samples.npy" in sample


def decode_chunk(sample: dict, shape: tuple[int, ...] | None, dtype: str | None, num_classes: int,
                 num_rows: int | None) -> tuple[Block | None, np.ndarray | None, str]:
    """(all rows, mask of the bad ones or None, why they are bad) of a chunk entry holding
    `num_rows` samples (None: as many as it holds). A chunk that does not parse or match is
    bad as a whole (no block); in a conditional run a label outside the classes is bad alone."""
    try:
        samples, labels, keys = (np.load(io.BytesIO(sample[name]), allow_pickle=False) for name in CHUNK_FIELDS)
    except Exception as err:  # noqa: BLE001 - a missing member or any decoder failure: a corrupt chunk
        reason = f"no member {err}" if isinstance(err, KeyError) else f"{type(err).__name__}: {err}"
        return None, None, f"corrupt chunk ({reason})"
    rows = len(samples) if num_rows is None else num_rows
    problem = ""
    if samples.shape[:1] != (rows,) or labels.shape != (rows,) or keys.shape != (rows,):
        problem = f"{len(samples)} samples, {labels.size} labels and {keys.size} keys instead of {rows} each"
    elif shape is not None and tuple(samples.shape[1:]) != tuple(shape):
        problem = f"samples of shape {list(samples.shape[1:])} instead of the dataset's {list(shape)}"
    elif dtype is not None and str(samples.dtype) != dtype:
        problem = f"dtype {samples.dtype} instead of the dataset's {dtype}"
    elif labels.dtype.kind not in "iu" or keys.dtype.kind not in "iu":
        problem = f"labels of dtype {labels.dtype} and keys of {keys.dtype} (integers expected)"
    if problem:
        return None, None, f"corrupt chunk ({problem})"
    block = Block(samples, labels.astype(np.int64, copy=False), keys.astype(np.int64, copy=False))
    if num_classes <= 0:
        return block, None, ""
    outside = (block.labels < 0) | (block.labels >= num_classes)
    if not outside.any():
        return block, None, ""
    return block, outside, f"label {int(block.labels[outside][0])} outside the dataset's {num_classes} classes"


def sample_block(array: np.ndarray, label: int, key: str) -> Block:
    """One per-sample record as a block of one row (numeric keys as int64, others kept as text)."""
    keys = np.array([int(key)], dtype=np.int64) if key.isdigit() else np.array([key], dtype=object)
    return Block(array[None], np.array([label], dtype=np.int64), keys)


def encode(key: str, array: np.ndarray, label: int, fmt: str) -> dict:
    """The tar members of one sample, all as bytes (the writer adds nothing of its own)."""
    if fmt == "npy":
        image = _array_bytes(array)
    else:
        image = _encode_image(array, fmt)
    return {"__key__": key, fmt: image, "cls": str(int(label)).encode()}


def _encode_image(array: np.ndarray, fmt: str) -> bytes:
    from PIL import Image

    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[0] not in (1, 3):
        raise ValueError(f"--format {fmt} stores 1- or 3-channel uint8 images; these samples are "
                         f"{array.dtype} of shape {list(array.shape)}: use --format npy")
    pil = Image.fromarray(array[0] if array.shape[0] == 1 else array.transpose(1, 2, 0))
    buffer = io.BytesIO()
    # PNG is lossless; JPEG at quality 95 without chroma subsampling keeps fine detail.
    options = {"format": "PNG", "compress_level": 1} if fmt == "png" else \
        {"format": "JPEG", "quality": 95, "subsampling": 0}
    pil.save(buffer, **options)
    return buffer.getvalue()


def _decode_image(data: bytes, channels: int) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as pil:
        pil = pil.convert("L" if channels == 1 else "RGB")
        array = np.asarray(pil)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def decode(sample: dict, shape: tuple[int, ...] | None, dtype: str | None,
           num_classes: int) -> tuple[np.ndarray, int, str]:
    """(array, label, key) of a raw webdataset sample, or BadSample naming what is wrong.

    num_classes > 0 (a conditional run) requires a label in 0..num_classes-1; otherwise
    labels are not read at all.
    """
    key = sample.get("__key__", "?")
    field = next((f for f in IMAGE_FIELDS if f in sample), None)
    if field is None:
        present = sorted(k for k in sample if not k.startswith("__"))
        raise BadSample(f"no image member (.npy/.png/.jpg), only {present}")
    try:
        if field == "npy":
            array = np.load(io.BytesIO(sample[field]), allow_pickle=False)
        else:
            array = _decode_image(sample[field], shape[0] if shape else 3)
    except Exception as err:  # any decoder failure means a corrupt member
        raise BadSample(f"corrupt .{field}: {type(err).__name__}: {err}") from err
    if shape is not None and tuple(array.shape) != tuple(shape):
        raise BadSample(f"shape {list(array.shape)} instead of the dataset's {list(shape)}")
    if dtype is not None and str(array.dtype) != dtype:
        raise BadSample(f"dtype {array.dtype} instead of the dataset's {dtype}")
    label = -1
    if num_classes > 0:
        if "cls" not in sample:
            raise BadSample("no label (.cls) in a class-conditional run")
        try:
            label = int(sample["cls"])
        except ValueError as err:
            raise BadSample(f"label {sample['cls'][:20]!r} is not an integer") from err
        if not 0 <= label < num_classes:
            raise BadSample(f"label {label} outside the dataset's {num_classes} classes")
    return array, label, key
