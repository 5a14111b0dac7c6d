"""Resident mode: the whole dataset in one uint8 array, in host or device memory, and batches
gathered from it by index. For datasets that fit in memory (MNIST, CIFAR-10, FFHQ-64: a few
GB) it has no worker processes, no shuffle buffer and no per-sample Python: a batch is one
`index_select`.

Every rank holds the whole array (read once when the loader is opened, shards in parallel
threads). The order is one stream of epochs, epoch e being a permutation of all info.count
rows seeded by (train.seed, e) alone; global batch k is the stream's k-th run of
batch_per_device x world_size rows and rank r takes its r-th part. So the data a step trains
on depends on the global batch size only: not on the worker count, and the same for
1 process x 2B as for 2 processes x B. A position is (epoch, offset) of the next global
batch: a resume continues from it exactly.

A bad sample keeps its row and its place in the order, so every rank has the same order
whatever its reads met: where the order reaches it, the batch counts it as bad (on the rank
whose part it is in, once per epoch, as a stream would) and takes a good row drawn at random
for that place instead (seeded by (train.seed, epoch)), so a corrupt chunk of 100 samples
adds 100 random repeats to an epoch, not 100 copies of one sample.

`choose` picks the mode for data.resident=auto: resident in host memory when one copy is at
most AUTO_MAX_BYTES and a copy per process on the node fits in a quarter of the memory
available; streamed otherwise (docs/data.md). A resumed run keeps the checkpoint's mode while
that still fits, so an auto run does not change layout between legs.
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
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

RESIDENT_ORDER, RESIDENT_FILL = 3, 4  # seed purposes (stream.py numbers 1 and 2, plan.py 0)
AUTO_MAX_BYTES = 4 << 30
AUTO_MEMORY_SHARE = 4  # of the node's available memory, all its processes' copies together
MAX_MESSAGES = 3  # per batch
MAX_KEPT_MESSAGES = 1024  # distinct ones kept from loading; later bad samples share the last
MAX_LOAD_THREADS = 8
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


def choose(info: DatasetInfo, setting: str, processes_on_node: int, available_bytes: int,
           previous: str | None = None) -> tuple[str, str]:
    """(mode, why): "host", "device" or "off" for data.resident=`setting`; `previous` is the
    data mode a resumed checkpoint recorded ("resident" or a stream format), kept under auto
    while it still fits."""
    if setting in ("host", "device"):
        if info.shard_counts is None:
            raise UserError(f"data.resident={setting} needs the dataset's index.json (data.path is a shard pattern); "
                            "point data.path at the prepared directory, or set data.resident=off")
        return setting, f"data.resident={setting}"
    if setting == "off":
        return "off", "data.resident=off"
    if info.shard_counts is None:
        return "off", "streamed: a shard pattern has no sample count to size it by"
    size = info.count * info.sample_bytes
    gib = size / 2**30
    if size > AUTO_MAX_BYTES:
        return "off", f"streamed: {gib:.1f} GiB decoded is above the {AUTO_MAX_BYTES / 2**30:.0f} GiB held resident"
    if processes_on_node * size > available_bytes / AUTO_MEMORY_SHARE:
        return "off", (f"streamed: {processes_on_node} copies of {gib:.2f} GiB exceed a quarter of the "
                       f"{available_bytes / 2**30:.0f} GiB available")
    from gan_dist.data.stream import STREAM_FORMAT

    if previous == STREAM_FORMAT:  # it would fit, but switching would start a new epoch
        return "off", "streamed, as the checkpoint was (data.resident=host holds it resident from the next epoch)"
    held = f"{gib:.2f} GiB" if gib >= 1 else f"{size / 2**20:.1f} MiB"
    return "host", f"resident in host memory: {held} decoded, one copy per process"


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
        self.data: Loaded | None = None
        self._orders: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        if not self.num_epochs:
            raise TypeError("an endless resident loader has no length")
        return self.num_epochs * self.info.count // (self.batch * self.world_size)

    def load(self) -> ResidentLoader:
        """Read the dataset into memory now (else the first iteration does)."""
        if self.data is None:
            self.data = load_rows(self.info, self.conditional, self.max_shard_retries, self.retry_backoff_s,
                                  self.device)
        return self

    def __iter__(self):
        from gan_dist.data.stream import Batch

        data = self.load().data
        if data.fatal:
            yield Batch(None, None, np.zeros(0, np.int64), data.bad_count, data.messages[:MAX_MESSAGES],
                        fatal=data.fatal, shard_failures=data.failures, shard_retries=data.retries)
            return
        count, global_batch = self.info.count, self.batch * self.world_size
        epoch, offset = self._start()
        position = epoch * count + offset  # in the stream of epochs
        first = True
        while not self.num_epochs or position + global_batch <= self.num_epochs * count:
            rows = position + self.rank * self.batch + np.arange(self.batch)
            position += global_batch
            yield self._batch(data, *self._index(rows, count), *divmod(position, count), first=first)
            first = False

    def _start(self) -> tuple[int, int]:
        workers = self.start.get("workers", {})
        if 0 in workers:
            return int(workers[0][0]), int(workers[0][1])
        return int(self.start.get("epoch", 0)), 0

    def _index(self, rows: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
        """(the rows the order names at stream positions `rows`, the rows gathered there)."""
        epochs, offsets = np.divmod(rows, count)
        named, gathered = np.empty_like(rows), np.empty_like(rows)
        for epoch in np.unique(epochs).tolist():
            where = epochs == epoch
            order, filled = self._order(epoch, count)
            named[where], gathered[where] = order[offsets[where]], filled[offsets[where]]
        return named, gathered

    def _order(self, epoch: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """Epoch `epoch`'s permutation, and the same with each bad row's place given to a random good row."""
        if epoch not in self._orders:
            self._orders = {e: o for e, o in self._orders.items() if e >= epoch - 1}
            order = np.random.default_rng(derive_seed(self.seed, epoch, RESIDENT_ORDER)).permutation(count)
            filled = order
            if self.data.message_of is not None:
                bad = self.data.message_of[order] >= 0
                fill = np.random.default_rng(derive_seed(self.seed, epoch, RESIDENT_FILL))
                filled = order.copy()
                filled[bad] = self.data.good[fill.integers(len(self.data.good), size=int(bad.sum()))]
            self._orders[epoch] = (order, filled)
        return self._orders[epoch]

    def _batch(self, data: Loaded, named: np.ndarray, index: np.ndarray, epoch: int, position: int, first: bool):
        from gan_dist.data.stream import Batch

        bad_count, messages = 0, ()
        if data.message_of is not None:  # some rows are bad: count those the order reached here
            message_ids = data.message_of[named]
            bad = message_ids >= 0
            bad_count = int(bad.sum())
            messages = tuple(data.messages[i] for i in dict.fromkeys(message_ids[bad].tolist()))[:MAX_MESSAGES]
        where = torch.from_numpy(index).to(data.samples.device)
        samples = data.samples.index_select(0, where)
        if self.pin_memory and samples.device.type == "cpu":
            samples = samples.pin_memory()
        labels = data.labels.index_select(0, where)
        # Storage events and bytes are this leg's reads: every rank's, reported once.
        return Batch(samples, labels, data.keys[index], bad_count, messages, worker=0, epoch=epoch,
                     position=position, shard_failures=data.failures if first else 0,
                     shard_retries=data.retries if first else 0, read_bytes=data.read_bytes if first else 0)


class Loaded:
    """The dataset in memory. Bad rows stay in place (zeros): `message_of` maps each row to
    its message (-1: good) and `good` lists the good rows; both None when all are good."""

    def __init__(self, samples: torch.Tensor, labels: torch.Tensor, keys: np.ndarray):
        self.samples, self.labels, self.keys = samples, labels, keys
        self.message_of: np.ndarray | None = None
        self.good: np.ndarray | None = None
        self.messages: list[str] = []
        self.bad_count = self.failures = self.retries = self.read_bytes = 0
        self.fatal = ""


class _Rows:
    """The arrays every loading thread writes its shard's rows into (each its own rows)."""

    def __init__(self, info: DatasetInfo):
        self.samples = np.empty((info.count, *info.shape), dtype=info.dtype)
        self.labels = np.zeros(info.count, dtype=np.int64)
        self.keys = np.zeros(info.count, dtype=np.int64)
        self.text_keys: list[tuple[int, np.ndarray]] = []  # a foreign shard's keys that are no numbers
        self.bad_runs: list[tuple[int, int, int, str]] = []  # (first row, count, shard, message)
        self.lock = threading.Lock()

    def place(self, block: Block, row: int) -> None:
        rows = slice(row, row + len(block))
        self.samples[rows] = block.samples
        self.labels[rows] = block.labels
        if block.keys.dtype.kind in "iu":
            self.keys[rows] = block.keys
        else:
            with self.lock:
                self.text_keys.append((row, block.keys))

    def mark_bad(self, bad: BadSample, row: int, shard: int) -> None:
        self.samples[row:row + bad.count] = 0
        with self.lock:
            self.bad_runs.append((row, bad.count, shard, str(bad)))

    def messages_of_rows(self, urls: list[str]) -> tuple[np.ndarray, list[str]]:
        """(each row's message index, -1 for good; the messages): by row, whatever order the
        threads met them in, so every rank and run names a bad sample alike."""
        message_of = np.full(len(self.labels), -1, dtype=np.int32)
        messages, overflow = [], {}
        for row, count, shard, message in sorted(self.bad_runs):
            if len(messages) >= MAX_KEPT_MESSAGES and shard not in overflow:
                overflow[shard] = len(messages)
                messages.append(f"{urls[shard]}: a bad sample (only the first {MAX_KEPT_MESSAGES} bad runs keep "
                                "their own message)")
            if shard in overflow:
                message_of[row:row + count] = overflow[shard]
            else:
                message_of[row:row + count] = len(messages)
                messages.append(message)
        return message_of, messages

    def all_keys(self) -> np.ndarray:
        if not self.text_keys:
            return self.keys
        keys = self.keys.astype(object)
        for row, text in self.text_keys:
            keys[row:row + len(text)] = text
        return keys


def load_rows(info: DatasetInfo, conditional: bool, max_shard_retries: int, retry_backoff_s: float,
              device=None) -> Loaded:
    """Every shard decoded into its rows of one array (shards in parallel threads), then moved
    to `device` (None: stays in host memory)."""
    starts = np.concatenate([[0], np.cumsum(info.shard_counts)]).astype(np.int64)
    rows = _Rows(info)
    threads = max(1, min(MAX_LOAD_THREADS, os.cpu_count() or 1, len(info.urls)))
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(lambda shard: _load_shard(info, shard, int(starts[shard]), rows, conditional,
                                                          max_shard_retries, retry_backoff_s),
                                range(len(info.urls))))
    samples = torch.from_numpy(rows.samples)
    if device is not None:
        samples = samples.to(device)
    data = Loaded(samples, torch.from_numpy(rows.labels).to(samples.device), rows.all_keys())
    message_of, data.messages = rows.messages_of_rows(info.urls)
    data.failures, data.retries = sum(r[1] for r in results), sum(r[2] for r in results)
    data.read_bytes = sum(r[3] for r in results)
    data.fatal = next((r[0] for r in results if r[0]), "")
    bad = message_of >= 0
    data.bad_count = int(bad.sum())
    good = np.flatnonzero(~bad)
    if not data.fatal and not len(good):
        data.fatal = f"no readable sample among the {info.count}, e.g. {data.messages[0] if data.messages else '?'}"
    elif data.bad_count:
        data.message_of, data.good = message_of, good
    return data


def _load_shard(info: DatasetInfo, shard: int, first: int, rows: _Rows, conditional: bool, max_shard_retries: int,
                retry_backoff_s: float) -> tuple[str, int, int, int]:
    """Shard `shard` decoded into rows [first, first + its count), retried where it broke off:
    (fatal message or "", failures, retries, bytes read)."""
    counter, failures, retries = Counter(), 0, 0
    delivered, count = 0, info.shard_counts[shard]
    if count == 0:  # an empty shard's tar has no members: reading it would fail as a lost shard
        return "", 0, 0, 0
    for attempt in range(max_shard_retries + 1):
        try:
            for record in read_piece(info.urls[shard], Piece(shard, delivered, count),
                                     info.offsets[shard] if info.offsets else None, info.shape, info.dtype,
                                     info.num_classes if conditional else 0, counter, layout=info.layout(shard)):
                if isinstance(record, BadSample):
                    rows.mark_bad(record, first + delivered, shard)
                    delivered += record.count
                else:
                    rows.place(record, first + delivered)
                    delivered += len(record)
            return "", failures, retries, counter.bytes
        except ReadFailure as err:
            failures += 1
            if attempt == max_shard_retries:
                fatal = (f"shard unreadable: {err}; it failed {attempt + 1} times while the dataset was loaded "
                         f"(data.max_shard_retries={max_shard_retries})")
                return fatal, failures, retries, counter.bytes
            time.sleep(min(120.0, retry_backoff_s * 2**attempt))
            retries += 1
    raise AssertionError("unreachable")
