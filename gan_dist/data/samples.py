"""One sample on disk: how `gan-dist prepare` encodes it and how the reader checks and decodes it.

A sample is `<key>.npy` (raw uint8 CHW, or float32 points), `<key>.png` or `<key>.jpg`,
plus `<key>.cls` (the integer label as text). Decoding never returns a tensor it has not
checked against the dataset's shape and dtype: anything else is a `BadSample` with a reason.
"""

from __future__ import annotations

import io

import numpy as np

FORMATS = ("npy", "png", "jpg")
IMAGE_FIELDS = ("npy", "png", "jpg", "jpeg")


class BadSample(Exception):
    """A sample that cannot become a training tensor; the message says why."""


def encode(key: str, array: np.ndarray, label: int, fmt: str) -> dict:
    """The tar members of one sample, all as bytes (the writer adds nothing of its own)."""
    if fmt == "npy":
        buffer = io.BytesIO()
        np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
        image = buffer.getvalue()
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
