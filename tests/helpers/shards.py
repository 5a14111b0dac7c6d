"""Editing a prepared dataset the way storage and users break it, keeping index.json true (test-only)."""

from __future__ import annotations

import json
from pathlib import Path

from gan_dist.data.prepare import sha256_of


def rewrite_shard(dataset: Path, shard: int, samples: list[dict], rows: list[int] | None = None) -> Path:
    """Replace shard `shard` with raw webdataset entries (samples, or chunks of `rows[i]`
    samples); its count, offsets, sha256 and class counts in index.json follow, as a prepare
    of these entries would write them."""
    import webdataset as wds

    index = json.loads((dataset / "index.json").read_text())
    entry = index["shards"][shard]
    path = dataset / entry["name"]
    offsets, class_counts = [0], [0] * len(index["classes"])
    with wds.TarWriter(str(path), mtime=0, encoder=False) as sink:
        for sample in samples:
            sink.write(sample)
            offsets.append(sink.tarstream.offset)
            label = sample.get("cls", b"").decode(errors="replace")
            if label.isdigit() and int(label) < len(class_counts):
                class_counts[int(label)] += 1
    count = len(samples) if rows is None else sum(rows)
    entry.update(count=count, offsets=offsets, sha256=sha256_of(path), class_counts=class_counts)
    index["count"] = sum(s["count"] for s in index["shards"])
    (dataset / "index.json").write_text(json.dumps(index))
    return path


def keys_in(url: str) -> list[int]:
    """The sample keys of a local shard in their order, whichever layout it has."""
    import io
    import tarfile

    import numpy as np

    keys = []
    with tarfile.open(url) as tar:
        for member in tar:
            key, _, field = member.name.partition(".")
            if field == "keys.npy":
                keys.extend(np.load(io.BytesIO(tar.extractfile(member).read())).tolist())
            elif field in ("npy", "png", "jpg") and key.isdigit():
                keys.append(int(key))
    return keys
