"""Shards -> batches: an endless, deterministic webdataset stream per process.

Epoch e permutes the shard list with a seed of (train.seed, e) that every rank shares,
then deals the shards out over the *slots* rank * num_workers + worker: shards are split
by GLOBAL rank, then by worker, and no sample is read twice within an epoch. When there
are fewer shards than slots, every slot reads all shards and keeps every slots-th sample
instead, so no worker is ever left without data. The stream runs through epoch after
epoch without end: all ranks take the same number of steps and DDP never waits on a rank
that ran out. Everything random is a function of (seed, global rank, worker, epoch);
webdataset's own shuffle would otherwise seed itself from the pid and the clock.

Decoding runs in the workers; batches stay uint8 (normalisation and augmentation happen on
the device). A sample that cannot be decoded becomes a counted, named `bad` entry of the
next batch, never a tensor; the trainer skips or raises according to data.on_error. The
loader is never passed through `accelerator.prepare`, which would split it a second time.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from gan_dist.data.samples import BadSample, decode
from gan_dist.errors import UserError
from gan_dist.preempt import ignore_stop_signals
from gan_dist.seeds import derive_seed

REMOTE = ("pipe:", "http:", "https:")
# webdataset's own http opener retries for a minute and never gives up on a stalled
# transfer; ours fails a shard that delivers under 1 KiB/s for a minute.
CURL = "pipe:curl --fail --silent --show-error --location --connect-timeout 30 --retry 3 --speed-limit 1024 --speed-time 60"
SHARD_ORDER, SAMPLE_ORDER, LOADER = 0, 1, 2  # seed purposes
MAX_BAD_IN_A_ROW = 1000
MAX_MESSAGES = 3


@dataclass
class DatasetInfo:
    urls: list[str]
    shape: tuple[int, ...]
    dtype: str
    count: int = 0
    classes: list[str] = field(default_factory=list)
    shard_counts: list[int] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)


class Batch(NamedTuple):
    samples: torch.Tensor | None
    labels: torch.Tensor | None
    keys: list[str]
    bad_count: int = 0
    bad_messages: tuple[str, ...] = ()
    fatal: str = ""
    worker: int = 0  # the (rotated) worker that made it, and where its stream stood after it:
    epoch: int = 0  # records `position` of epoch `epoch` consumed (what a resume skips to)
    position: int = 0


class _Bad(NamedTuple):
    message: str
    count: int = 1
    whole_shard: bool = False  # a read failure (maybe transient), not a bad sample: never cached


# ------------------------------------------------------------------ opening
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
        detail = getattr(err, "stderr", b"") or b""
        raise UserError(f"data.path: cannot read {location} ({type(err).__name__}: {err} "
                        f"{detail.decode(errors='replace').strip()[:200]})") from err


def _shard_url(location: str, name: str) -> str:
    """A shard's URL beside its index: same directory, or the same command with the name swapped in."""
    if location.startswith("pipe:"):
        return location.replace("index.json", name)
    url = f"{location.rsplit('/', 1)[0]}/{name}"
    return f"{CURL} {url}" if url.startswith(("http:", "https:")) else url


def _from_index(location: str) -> DatasetInfo:
    index = _read_index(location)
    shards = index.get("shards", [])
    if not shards or index.get("count", 0) == 0:
        raise UserError(f"data.path: {location} lists no samples; re-run gan-dist prepare")
    urls = [_shard_url(location, shard["name"]) for shard in shards]
    _check_local(urls)
    return DatasetInfo(urls, tuple(index["shape"]), index["dtype"], index["count"], index.get("classes", []),
                       [shard["count"] for shard in shards])


def open_dataset(path: str) -> DatasetInfo:
    """A dataset directory or index.json (local or http), or a shard pattern; checked before training."""
    import webdataset as wds

    if not path:
        raise UserError("no dataset path given; set data.path=DIR (a directory with index.json or a shard pattern)")
    if path.startswith(("s3:", "gs:")):
        tool = "aws s3 cp URL -" if path.startswith("s3:") else "gsutil cat URL"
        raise UserError(f"data.path={path}: object stores are read through a command; use "
                        f"data.path='pipe:{tool}' (see docs/data.md, Remote storage)")
    if path.startswith(("http:", "https:", "pipe:")) and ("index.json" in path or path.endswith("/")):
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
    first = _first_sample(urls[0])
    return DatasetInfo(urls, tuple(first.shape), str(first.dtype))


def _first_sample(url: str) -> np.ndarray:
    problems = []
    for record in _read_shard(url, None, None, 0):
        if not isinstance(record, _Bad):
            return record[0]
        problems.append(record.message)
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


# ------------------------------------------------------------------ reading
def _read_shard(url: str, shape, dtype, num_classes: int, expected: int = 0):
    """Decoded (array, label, key) tuples of one shard, with a `_Bad` for each unusable sample.

    A shard that breaks off (failed download or command) ends with one `_Bad` naming the
    shard and the last good key; the stream then goes on to the next shard. Python's tarfile
    reads a truncated tar as a short one without complaint, so a shard that yields fewer
    samples than index.json lists (`expected`) counts the missing ones as bad.
    """
    import webdataset as wds

    last_key, seen = "(none)", 0
    try:
        for raw in wds.tarfile_samples(iter([{"url": url}])):
            key = raw.get("__key__", "?")
            seen += 1
            try:
                record = decode(raw, shape, dtype, num_classes)
            except BadSample as err:
                yield _Bad(f"{url} key {key}: {err}")
                continue
            last_key = key
            yield record
    except Exception as err:  # noqa: BLE001 - tarfile, gopen and subprocess errors all mean an unreadable shard
        reason = str(err).splitlines()[0] if str(err) else ""
        yield _Bad(f"{url}: unreadable after key {last_key} ({type(err).__name__}: {reason})",
                   max(1, expected - seen), whole_shard=True)
        return
    if seen < expected:
        yield _Bad(f"{url}: truncated, {seen} of its {expected} samples after key {last_key}", expected - seen,
                   whole_shard=True)


@dataclass
class StreamSpec:
    """Everything a worker needs to produce its part of the stream (picklable)."""

    urls: list[str]
    shape: tuple[int, ...]
    dtype: str
    num_classes: int  # > 0 only in conditional runs: labels are then required
    batch_per_device: int
    seed: int
    rank: int
    world_size: int
    shuffle_buffer: int
    cache_bytes: int = 0
    num_epochs: int = 0  # 0: endless
    shard_counts: list[int] | None = None  # from index.json: lets a truncated shard be noticed
    start: dict | None = None  # resume: {"rotation": r, "workers": {worker: (epoch, position)}}


def epoch_assignment(num_shards: int, seed: int, epoch: int, slot: int, num_slots: int) -> tuple[list[int], bool]:
    """(shard indices to read, whether to keep only every num_slots-th sample) for one slot."""
    order = np.random.default_rng(derive_seed(seed, epoch, SHARD_ORDER)).permutation(num_shards)
    if num_shards >= num_slots:
        return [int(i) for i in order[slot::num_slots]], False
    return [int(i) for i in order], True


class ShardStream(torch.utils.data.IterableDataset):
    def __init__(self, spec: StreamSpec):
        super().__init__()
        self.spec = spec
        self.cache: dict[str, list] = {}
        self.cache_used = 0

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        loader_worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        spec = self.spec
        start = spec.start or {"rotation": 0, "workers": {}}
        # The DataLoader always asks worker 0 first; after a resume the next batch may be due
        # from another worker, so loader worker i plays worker (i + rotation) % num_workers.
        worker = (loader_worker + start["rotation"]) % num_workers
        first_epoch, skip = start["workers"].get(worker, (start.get("epoch", 0), 0))
        slot, num_slots = spec.rank * num_workers + worker, spec.world_size * num_workers
        epochs = itertools.count(first_epoch) if spec.num_epochs == 0 else range(first_epoch, spec.num_epochs)
        records = itertools.chain.from_iterable(
            self._numbered(e, worker, slot, num_slots, skip if e == first_epoch else 0) for e in epochs)
        return _batches(records, spec.batch_per_device, worker)

    def _numbered(self, epoch: int, worker: int, slot: int, num_slots: int, skip: int):
        """(epoch, position after it, record) for one epoch, starting after `skip` records."""
        records = self._epoch(epoch, worker, slot, num_slots)
        for position, record in enumerate(itertools.islice(records, skip, None), start=skip + 1):
            yield epoch, position, record

    def _epoch(self, epoch: int, worker: int, slot: int, num_slots: int):
        import webdataset as wds

        spec = self.spec
        shard_ids, by_sample = epoch_assignment(len(spec.urls), spec.seed, epoch, slot, num_slots)
        records = itertools.chain.from_iterable(self._shard(i) for i in shard_ids)
        if by_sample:
            records = itertools.islice(records, slot, None, num_slots)
        if spec.shuffle_buffer > 1:
            seed = derive_seed(spec.seed, spec.rank, worker, epoch, SAMPLE_ORDER)
            records = wds.shuffle(spec.shuffle_buffer, initial=spec.shuffle_buffer, seed=seed)(records)
        return records

    def _shard(self, index: int):
        """A shard's records, replayed from memory when it fits in the cache (same order either way)."""
        spec = self.spec
        url = spec.urls[index]
        if url in self.cache:
            yield from self.cache[url]
            return
        expected = spec.shard_counts[index] if spec.shard_counts else 0
        # Records are kept only while the shard still fits in what is left of the cache, so a
        # worker never holds more than data.cache_mb of decoded samples; a shard whose read
        # failed (perhaps a network blip) is read again next time instead.
        records, size_bytes, keep = [], 0, True
        for record in _read_shard(url, spec.shape, spec.dtype, spec.num_classes, expected):
            if keep:
                size_bytes += 64 if isinstance(record, _Bad) else record[0].nbytes + 64
                keep = self.cache_used + size_bytes <= spec.cache_bytes and not (
                    isinstance(record, _Bad) and record.whole_shard)
                records = records if keep else []
                if keep:
                    records.append(record)
            yield record
        if keep:
            self.cache[url] = records
            self.cache_used += size_bytes


def _batches(numbered_records, batch_size: int, worker: int):
    """Full batches of good samples; bad ones are counted into the next batch (the rest dropped at the end)."""
    items, bad_count, messages, bad_in_a_row = [], 0, [], 0
    for epoch, position, record in numbered_records:
        if isinstance(record, _Bad):
            bad_count, bad_in_a_row = bad_count + record.count, bad_in_a_row + record.count
            if len(messages) < MAX_MESSAGES:
                messages.append(record.message)
            if bad_in_a_row >= MAX_BAD_IN_A_ROW:
                yield Batch(None, None, [], bad_count, tuple(messages),
                            fatal=f"{bad_in_a_row} bad samples in a row and no good one, e.g. {messages[0]}")
                return
            continue
        bad_in_a_row = 0
        items.append(record)
        if len(items) == batch_size:
            arrays, labels, keys = zip(*items)
            yield Batch(torch.from_numpy(np.stack(arrays)), torch.tensor(labels, dtype=torch.int64), list(keys),
                        bad_count, tuple(messages), worker=worker, epoch=epoch, position=position)
            items, bad_count, messages = [], 0, []
    if bad_count:  # a finite pass that ends on bad samples still reports them
        yield Batch(None, None, [], bad_count, tuple(messages))


def _as_is(batch):
    # Batches are collated in the workers; the default collate would walk them again.
    return batch


def make_loader(info: DatasetInfo, batch_per_device: int, seed: int, rank: int, num_workers: int,
                shuffle_buffer: int, cache_mb: float = 0, pin_memory: bool = False, world_size: int = 1,
                conditional: bool = False, num_epochs: int = 0, start: dict | None = None):
    """This rank's DataLoader of `Batch`es: endless (num_epochs=0), or a finite pass of `num_epochs`."""
    spec = StreamSpec(info.urls, info.shape, info.dtype, info.num_classes if conditional else 0,
                      batch_per_device, seed, rank, world_size, shuffle_buffer, int(cache_mb * 2**20), num_epochs,
                      info.shard_counts, start)
    loader = torch.utils.data.DataLoader(
        ShardStream(spec), batch_size=None, collate_fn=_as_is, num_workers=num_workers,
        generator=torch.Generator().manual_seed(derive_seed(seed, rank, LOADER)),
        persistent_workers=num_workers > 0 and num_epochs == 0, pin_memory=pin_memory,
        worker_init_fn=ignore_stop_signals if num_workers > 0 else None,
        prefetch_factor=4 if num_workers > 0 else None,
    )
    return loader if num_epochs == 0 else FinitePass(loader, finite_batches(info, spec, num_workers))


def finite_batches(info: DatasetInfo, spec: StreamSpec, num_workers: int) -> int:
    """Batches every rank yields in a finite pass: the smallest rank's count (known from index.json)."""
    if info.shard_counts is None:
        raise UserError("a finite pass over the data needs its index.json (give data.path as the dataset directory)")
    slots_per_rank = max(1, num_workers)
    num_slots = spec.world_size * slots_per_rank
    per_rank = []
    for rank in range(spec.world_size):
        total = 0
        for slot in range(rank * slots_per_rank, (rank + 1) * slots_per_rank):
            samples = 0
            for epoch in range(spec.num_epochs):
                shard_ids, by_sample = epoch_assignment(len(info.urls), spec.seed, epoch, slot, num_slots)
                in_shards = sum(info.shard_counts[i] for i in shard_ids)
                samples += len(range(slot, in_shards, num_slots)) if by_sample else in_shards
            total += samples // spec.batch_per_device
        per_rank.append(total)
    return min(per_rank)


class FinitePass:
    """A finite pass cut to the same number of batches on every rank, so no rank waits on another."""

    def __init__(self, loader, num_batches: int):
        self.loader, self.num_batches = loader, num_batches

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self):
        full = 0
        for batch in self.loader:
            if batch.keys and full == self.num_batches:
                return
            full += bool(batch.keys)
            yield batch  # batches of bad samples only are passed on, not counted
