"""Resident mode: the whole dataset in one uint8 array, in host or device memory, and batches
gathered from it by index. For datasets that fit in memory (MNIST, CIFAR-10, FFHQ-64: a few
GB) it has no worker processes, no shuffle buffer and no per-sample Python: a batch is one
`index_select`.

Every rank holds the whole array (read once when the loader first runs, shards in parallel
threads, bad samples dropped and counted). The order is one stream of epochs, epoch e being
a permutation of every sample seeded by (train.seed, e) alone; global batch k is the stream's
k-th run of batch_per_device x world_size samples and rank r takes its r-th part. So the
data a step trains on depends on the global batch size only: not on the worker count, and
the same for 1 process x 2B as for 2 processes x B. A position is (epoch, offset) of the next
global batch: a resume continues from it exactly.

`choose` picks the mode for data.resident=auto: resident in host memory when one copy is at
most AUTO_MAX_BYTES and a copy per process on the node fits in a quarter of the memory
available; streamed otherwise (docs/data.md).
"""

from __future__ import annotations

import concurrent.futures
import os
import time
from pathlib import Path

import numpy as np
import torch

from gan_dist.data.index import DatasetInfo
from gan_dist.data.plan import Piece
from gan_dist.data.reader import Counter, ReadFailure, read_piece
from gan_dist.data.samples import BadSample, Block
from gan_dist.errors import UserError
from gan_dist.seeds import derive_seed

RESIDENT_ORDER = 3  # seed purpose (stream.py numbers 1 and 2, plan.py 0)
AUTO_MAX_BYTES = 4 << 30
AUTO_MEMORY_SHARE = 4  # of the node's available memory, all its processes' copies together
MAX_LOAD_THREADS = 8
MAX_MESSAGES = 3
MODES = ("auto", "off", "host", "device")


def available_memory_bytes() -> int:
    """MemAvailable of this machine (Linux), else its physical memory."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def choose(info: DatasetInfo, setting: str, processes_on_node: int, available_bytes: int) -> tuple[str, str]:
    """(mode, why): "host", "device" or "off" for data.resident=`setting`."""
    size = info.count * info.sample_bytes
    if setting in ("host", "device"):
        if info.shard_counts is None:
            raise UserError(f"data.resident={setting} needs the dataset's index.json (data.path is a shard pattern); "
                            "point data.path at the prepared directory, or set data.resident=off")
        return setting, f"data.resident={setting}"
    if setting == "off":
        return "off", "data.resident=off"
    gib = size / 2**30
    if info.shard_counts is None:
        return "off", "streamed: a shard pattern has no sample count to size it by"
    if size > AUTO_MAX_BYTES:
        return "off", f"streamed: {gib:.1f} GiB decoded is above the {AUTO_MAX_BYTES / 2**30:.0f} GiB held resident"
    if processes_on_node * size > available_bytes / AUTO_MEMORY_SHARE:
        return "off", (f"streamed: {processes_on_node} copies of {gib:.2f} GiB exceed a quarter of the "
                       f"{available_bytes / 2**30:.0f} GiB available")
    return "host", f"resident in host memory: {gib:.2f} GiB decoded, one copy per process"


class _Data:
    """The loaded dataset and what loading it met (counted once per epoch, as a stream would)."""

    def __init__(self, samples, labels, keys, bad_count, messages, fatal, failures, retries, read_bytes):
        self.samples, self.labels, self.keys = samples, labels, keys
        self.bad_count, self.messages, self.fatal = bad_count, messages, fatal
        self.failures, self.retries, self.read_bytes = failures, retries, read_bytes


class ResidentLoader:
    """This rank's endless (or `num_epochs`) sequence of `Batch`es gathered from the array."""

    data_mode = "resident"  # as resume.layout records it

    def __init__(self, info: DatasetInfo, batch_per_device: int, seed: int, rank: int, world_size: int,
                 conditional: bool, num_epochs: int = 0, start: dict | None = None, max_shard_retries: int = 8,
                 retry_backoff_s: float = 2.0, device=None, pin_memory: bool = False):
        self.info, self.batch, self.seed = info, batch_per_device, seed
        self.rank, self.world_size, self.conditional = rank, world_size, conditional
        self.num_epochs, self.start = num_epochs, start or {}
        self.max_shard_retries, self.retry_backoff_s = max_shard_retries, retry_backoff_s
        self.device, self.pin_memory = device, pin_memory
        self.data: _Data | None = None

    def __len__(self) -> int:
        if not self.num_epochs:
            raise TypeError("an endless resident loader has no length")
        return self.num_epochs * self.info.count // (self.batch * self.world_size)

    def __iter__(self):
        from gan_dist.data.stream import Batch

        data = self.data = self.data or self._load()
        if data.fatal:
            yield Batch(None, None, [], data.bad_count, data.messages, fatal=data.fatal,
                        shard_failures=data.failures, shard_retries=data.retries)
            return
        count, global_batch = len(data.labels), self.batch * self.world_size
        epoch, offset = self._start()
        position = epoch * count + offset  # in the stream of epochs
        first = True
        while not self.num_epochs or position + global_batch <= self.num_epochs * count:
            rows = position + self.rank * self.batch + np.arange(self.batch)
            index = self._index(rows, count)
            new_epoch = first or (position + global_batch) // count != position // count
            position += global_batch
            yield self._batch(data, index, *divmod(position, count), report=new_epoch, first=first)
            first = False

    def _start(self) -> tuple[int, int]:
        workers = self.start.get("workers", {})
        if 0 in workers:
            return int(workers[0][0]), int(workers[0][1])
        return int(self.start.get("epoch", 0)), 0

    def _index(self, rows: np.ndarray, count: int) -> np.ndarray:
        epochs, offsets = np.divmod(rows, count)
        index = np.empty_like(rows)
        for epoch in np.unique(epochs).tolist():
            where = epochs == epoch
            index[where] = self._order(epoch, count)[offsets[where]]
        return index

    def _order(self, epoch: int, count: int) -> np.ndarray:
        cached = getattr(self, "_orders", {})
        if epoch not in cached:
            cached = {e: o for e, o in cached.items() if e >= epoch - 1}
            cached[epoch] = np.random.default_rng(derive_seed(self.seed, epoch, RESIDENT_ORDER)).permutation(count)
            self._orders = cached
        return cached[epoch]

    def _batch(self, data: _Data, index: np.ndarray, epoch: int, position: int, report: bool, first: bool):
        from gan_dist.data.stream import Batch

        where = torch.from_numpy(index).to(data.samples.device)
        samples = data.samples.index_select(0, where)
        if self.pin_memory and samples.device.type == "cpu":
            samples = samples.pin_memory()
        labels = data.labels.index_select(0, where.to(data.labels.device))
        # What loading met is counted on rank 0 once per epoch: a stream meets each bad sample
        # once per epoch on some rank; storage events and bytes on every rank, once.
        bad = report and self.rank == 0
        return Batch(samples, labels, data.keys[index], data.bad_count if bad else 0,
                     data.messages if bad else (), worker=0, epoch=epoch, position=position,
                     shard_failures=data.failures if first else 0, shard_retries=data.retries if first else 0,
                     read_bytes=data.read_bytes if first else 0)

    def _load(self) -> _Data:
        info = self.info
        starts = np.concatenate([[0], np.cumsum(info.shard_counts)]).astype(np.int64)
        samples = np.empty((info.count, *info.shape), dtype=info.dtype)
        labels = np.zeros(info.count, dtype=np.int64)
        keys = np.empty(info.count, dtype=object)
        good = np.zeros(info.count, dtype=bool)
        threads = max(1, min(MAX_LOAD_THREADS, os.cpu_count() or 1, len(info.urls)))
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            results = list(pool.map(lambda shard: self._load_shard(shard, int(starts[shard]), samples, labels,
                                                                  keys, good), range(len(info.urls))))
        bad_count = sum(r["bad"] for r in results)
        messages = tuple(m for r in results for m in r["messages"])[:MAX_MESSAGES]
        fatal = next((r["fatal"] for r in results if r["fatal"]), "")
        if not fatal and not good.any():
            fatal = f"no readable sample among the {info.count}, e.g. {messages[0] if messages else '?'}"
        if not good.all():  # rare: compact the good rows to the front
            keep = np.flatnonzero(good)
            samples, labels, keys = samples[keep], labels[keep], keys[keep]
        keys = _as_numbers(keys)
        tensor = torch.from_numpy(samples)
        if self.device is not None:
            tensor = tensor.to(self.device)
        return _Data(tensor, torch.from_numpy(labels).to(tensor.device), keys, bad_count, messages, fatal,
                     sum(r["failures"] for r in results), sum(r["retries"] for r in results),
                     sum(r["read_bytes"] for r in results))

    def _load_shard(self, shard: int, first: int, samples, labels, keys, good) -> dict:
        """Shard `shard` decoded into rows [first, first + its count), retried where it broke off."""
        info, counter = self.info, Counter()
        result = {"bad": 0, "messages": [], "fatal": "", "failures": 0, "retries": 0}
        delivered, count = 0, info.shard_counts[shard]
        for attempt in range(self.max_shard_retries + 1):
            try:
                piece = Piece(shard, delivered, count)
                for record in read_piece(info.urls[shard], piece, info.offsets[shard] if info.offsets else None,
                                         info.shape, info.dtype, info.num_classes if self.conditional else 0,
                                         counter, layout=info.layout(shard)):
                    row = first + delivered
                    if isinstance(record, BadSample):
                        result["bad"] += record.count
                        result["messages"] = (result["messages"] + [str(record)])[:MAX_MESSAGES]
                    else:
                        _place(record, row, samples, labels, keys, good)
                    delivered += record.count if isinstance(record, BadSample) else len(record)
                break
            except ReadFailure as err:
                result["failures"] += 1
                if attempt == self.max_shard_retries:
                    result["fatal"] = (f"shard unreadable: {err}; it failed {attempt + 1} times while the dataset "
                                       f"was loaded (data.max_shard_retries={self.max_shard_retries})")
                    break
                time.sleep(min(120.0, self.retry_backoff_s * 2**attempt))
                result["retries"] += 1
        return {**result, "read_bytes": counter.bytes}


def _as_numbers(keys: np.ndarray) -> np.ndarray:
    """int64 keys where every key is a number (what prepare writes), else the objects as they are."""
    try:
        return keys.astype(np.int64)
    except (TypeError, ValueError):
        return keys


def _place(block: Block, row: int, samples, labels, keys, good) -> None:
    rows = slice(row, row + len(block))
    samples[rows] = block.samples
    labels[rows] = block.labels
    keys[rows] = block.keys
    good[rows] = True
