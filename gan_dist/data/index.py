"""Opening a dataset: its index.json (local, http(s) or a command) or a shard pattern, checked
before training; its identity for checkpoints and caches; a warning for class-sorted shards.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from gan_dist.errors import UserError

REMOTE = ("pipe:", "http:", "https:")
# For shard patterns over http only (indexed http data is read with Range requests, reader.py):
# webdataset's own opener retries for a minute and never gives up on a stalled transfer;
# ours fails a shard that delivers under 1 KiB/s for a minute.
CURL = "pipe:curl --fail --silent --show-error --location --connect-timeout 30 --retry 3 --speed-limit 1024 --speed-time 60"
SKEW_P = 1e-6  # a shard whose class histogram is this unlikely under the dataset's shares is skewed


@dataclass
class DatasetInfo:
    urls: list[str]
    shape: tuple[int, ...]
    dtype: str
    count: int = 0
    classes: list[str] = field(default_factory=list)
    shard_counts: list[int] | None = None  # None: a shard pattern without index.json
    offsets: list[list[int]] | None = None  # per shard, the byte offset of each tar entry and of the end
    sha256s: list[str] | None = None
    class_counts: list[list[int]] | None = None
    order: str = ""  # "shuffled" or "source" (prepare --order); "" when the index does not say
    chunk_size: int = 1  # samples per tar entry (offsets are per entry); 1: the per-sample layout
    range_requests: bool = True  # False: an http(s) server that answers Range with the whole file

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def sample_bytes(self) -> int:
        import numpy as np

        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize

    def layout(self, shard: int):
        """How shard `shard` stores its samples (reader.Layout)."""
        from gan_dist.data.reader import Layout

        return Layout(self.chunk_size, self.shard_counts[shard] if self.shard_counts else None)

    @property
    def seekable(self) -> bool:
        """Whether a piece costs only its own bytes (local files; http with offsets)."""
        return all(not u.startswith("pipe:") for u in self.urls) and self.range_requests and (
            self.offsets is not None or all(not u.startswith(REMOTE) for u in self.urls))

    def identity(self) -> dict:
        """What names this dataset's content: its shards' sha256s, or (a pattern) their names."""
        parts = self.sha256s or [Path(u.rsplit(" ", 1)[-1]).name for u in self.urls]
        digest = hashlib.sha256(json.dumps([parts, list(self.shape), self.dtype, self.classes]).encode())
        return {"sha256": digest.hexdigest()[:16], "count": self.count, "order": self.order,
                "content": "sha256" if self.sha256s else "shard names"}


def _read_index(location: str) -> dict:
    try:
        if location.startswith(("http:", "https:")):
            with urllib.request.urlopen(location, timeout=60) as response:
                return json.loads(response.read())
        if location.startswith("pipe:"):
            done = subprocess.run(location[5:], shell=True, capture_output=True, timeout=300, check=True)
            return json.loads(done.stdout)
        return json.loads(Path(location).read_text())
    except (OSError, ValueError, subprocess.SubprocessError) as err:
        detail = (getattr(err, "stderr", b"") or b"").decode(errors="replace").strip()[:200]
        raise UserError(f"data.path: cannot read {location} ({type(err).__name__}: {err}"
                        f"{'; ' + detail if detail else ''})") from err


def _shard_url(location: str, name: str) -> str:
    """A shard's URL beside its index: same directory, or the same command with the name swapped in."""
    if location.startswith("pipe:"):
        return location.replace("index.json", name)
    return f"{location.rsplit('/', 1)[0]}/{name}"


def _from_index(location: str) -> DatasetInfo:
    index = _read_index(location)
    shards = index.get("shards", [])
    if not shards or index.get("count", 0) == 0:
        raise UserError(f"data.path: {location} lists no samples; re-run gan-dist prepare")
    urls = [_shard_url(location, shard["name"]) for shard in shards]
    _check_local(urls)
    has = {key: all(key in shard for shard in shards) for key in ("offsets", "sha256", "class_counts")}
    info = DatasetInfo(urls, tuple(index["shape"]), index["dtype"], index["count"], index.get("classes", []),
                       [shard["count"] for shard in shards],
                       [shard["offsets"] for shard in shards] if has["offsets"] else None,
                       [shard["sha256"] for shard in shards] if has["sha256"] else None,
                       [shard["class_counts"] for shard in shards] if has["class_counts"] else None,
                       index.get("order", ""), index.get("chunk_size", 1))
    if not isinstance(info.chunk_size, int) or isinstance(info.chunk_size, bool) or info.chunk_size < 1:
        raise UserError(f"data.path: {location} gives chunk_size {info.chunk_size} (at least 1: samples per tar "
                        "entry); re-run gan-dist prepare")
    if has["offsets"]:
        entries = [len(o) - 1 for o in info.offsets]
        if entries != [-(-n // info.chunk_size) for n in info.shard_counts]:
            raise UserError(f"data.path: {location} lists byte offsets that do not match its sample counts and "
                            f"chunk size {info.chunk_size}; re-run gan-dist prepare")
    if has["offsets"] and urls[0].startswith(("http:", "https:")):
        from gan_dist.data.reader import supports_range

        info.range_requests = supports_range(urls[0])
    return info


def open_dataset(path: str) -> DatasetInfo:
    """A dataset directory or index.json (local, http or pipe:), or a shard pattern; checked before training."""
    import webdataset as wds

    if not path:
        raise UserError("no dataset path given; set data.path=DIR (a directory with index.json or a shard pattern)")
    if path.startswith(("s3:", "gs:")):
        tool = "aws s3 cp URL -" if path.startswith("s3:") else "gsutil cat URL"
        raise UserError(f"data.path={path}: object stores are read through a command; use "
                        f"data.path='pipe:{tool}' (see docs/data.md, Remote storage)")
    if path.startswith(REMOTE) and ("index.json" in path or path.endswith("/")):
        return _from_index(path if "index.json" in path else path + "index.json")
    local = Path(path)
    if local.is_dir() or local.name == "index.json":
        index_file = local / "index.json" if local.is_dir() else local
        if not index_file.is_file():
            raise UserError(f"data.path={path} has no index.json; prepare it with gan-dist prepare")
        return _from_index(str(index_file))
    if not path.startswith(REMOTE) and not any(c in path for c in "{}*?[") and not local.exists():
        raise UserError(f"data.path={path} does not exist; write the dataset there with gan-dist prepare "
                        f"(... --out {path}) or point data.path at it")
    urls = [f"{CURL} {u}" if u.startswith(("http:", "https:")) else u for u in wds.shardlists.expand_urls(path)]
    _check_local(urls)
    # A pattern's chunk size is its first entry's row count (the shuffle's span and the read
    # plan count entries): prepare writes every entry but a shard's last with chunk_size rows.
    first, chunk_size = _first_sample(urls[0])
    return DatasetInfo(urls, tuple(first.shape), str(first.dtype), chunk_size=chunk_size)


def _first_sample(url: str):
    from gan_dist.data.plan import Piece
    from gan_dist.data.reader import Counter, ReadFailure, read_piece

    problems = []
    try:
        for record in read_piece(url, Piece(0, 0, None), None, None, None, 0, Counter()):
            if not isinstance(record, Exception):
                return record.samples[0], len(record)
            problems.append(str(record))
    except ReadFailure as err:
        problems.append(str(err))
    reason = problems[0] if problems else "it is empty"
    raise UserError(f"data.path: no readable sample in the first shard ({reason}); check data.path and that "
                    "the shard can be read from here")


def _check_local(urls: list[str]) -> None:
    missing = [u for u in urls if not u.startswith(REMOTE) and not Path(u).is_file()]
    if missing:
        raise UserError(f"data.path: {len(missing)} of {len(urls)} shards are missing, "
                        f"e.g. {missing[0]}; check data.path or re-run gan-dist prepare")
    empty = [u for u in urls if not u.startswith(REMOTE) and Path(u).stat().st_size == 0]
    if empty:
        raise UserError(f"data.path: shard {empty[0]} is empty; re-run gan-dist prepare")


def class_skew(info: DatasetInfo) -> str:
    """A warning when the shards hold skewed class shares (written in a class-sorted source's
    order), else ''. Shuffled datasets are not tested: among 1,000 shards some would fail by chance."""
    if info.num_classes < 2 or info.order == "shuffled":
        return ""
    histograms = info.class_counts or _first_shard_quarters(info)
    if not histograms:
        return ""
    from scipy.stats import chisquare

    totals = [sum(column) for column in zip(*histograms, strict=True)]
    shares = [t / max(1, sum(totals)) for t in totals]
    skewed = 0
    for counts in histograms:
        present = [(c, s * sum(counts)) for c, s in zip(counts, shares, strict=True) if s > 0]
        if sum(counts) >= 5 * len(present) and chisquare(*zip(*present, strict=True)).pvalue < SKEW_P:
            skewed += 1
    if skewed * 2 <= len(histograms):
        return ""
    return (f"{skewed} of the {len(histograms)} {'shards' if info.class_counts else 'quarters of the first shard'} "
            "hold class shares far from the dataset's (it was written in a class-sorted order): a shuffle "
            "buffer cannot mix them and an unconditional GAN follows whichever classes it is reading; "
            "re-prepare it with gan-dist prepare (its default order is shuffled)")


def _first_shard_quarters(info: DatasetInfo) -> list[list[int]]:
    """Class histograms of the 4 quarters of the first local shard (older indexes have no counts)."""
    import tarfile

    if not info.urls or info.urls[0].startswith(REMOTE):
        return []
    labels = []
    with tarfile.open(info.urls[0], mode="r:") as tar:
        for member in tar:
            if member.name.endswith(".cls"):
                try:
                    labels.append(int(tar.extractfile(member).read()))
                except ValueError:
                    continue
    labels = [label for label in labels if 0 <= label < info.num_classes]
    if len(labels) < 40 * info.num_classes:
        return []
    quarter = len(labels) // 4
    return [[labels[q * quarter:(q + 1) * quarter].count(c) for c in range(info.num_classes)] for q in range(4)]
