"""Shards -> batches: an endless, deterministic stream of the shards per process.

Each epoch is dealt over the *slots* rank * num_workers + worker by one planner (plan.py):
every sample once, slot sizes within one sample of each other, whatever the number of shards.
The stream runs through epoch after epoch without end: all ranks take the same number of
steps and DDP never waits on a rank that ran out. Everything random is a function of (seed,
global rank, worker, epoch); a shuffle seeded from the pid and the clock would make no two
runs, and no resume, alike.

A storage failure while reading a piece (reader.py) is one failure event: the rest of the
piece is deferred to the end of the slot's queue and tried again after a backoff, resuming
after the last sample it delivered, so no sample is read twice. The events are recorded
with the stream position, so a resume replays them and continues exactly. A piece that
fails data.max_shard_retries + 1 times ends the stream with a fatal batch naming it; the ranks
then stop together (health.py).

Decoding runs in the workers; batches stay uint8 (normalisation and augmentation happen on
the device). A sample that cannot be decoded becomes a counted, named `bad` entry of the
next batch, never a tensor; the trainer skips or raises according to data.on_error. The
loader is never passed through `accelerator.prepare`, which would split it a second time.
"""

from __future__ import annotations

import collections
import itertools
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from gan_dist.data.index import CURL, REMOTE, DatasetInfo, open_dataset  # noqa: F401 - re-exported
from gan_dist.data.plan import Piece, slot_pieces, unindexed_assignment
from gan_dist.data.reader import Counter, Layout, ReadFailure, read_piece
from gan_dist.data.samples import BadSample, Block, concatenate
from gan_dist.data.shuffle import capacity_rows, held_rows_bound, shuffled
from gan_dist.errors import UserError
from gan_dist.preempt import ignore_stop_signals, shut_down_at_exit
from gan_dist.seeds import derive_seed

SAMPLE_ORDER, LOADER = 1, 2  # seed purposes (plan.py's shard order is 0, resident.py's order 3)
STREAM_FORMAT = "stream/2"  # how positions count (resume.layout): /2 in units of blocks' rows (shuffle.py)
MAX_BAD_IN_A_ROW = 1000
MAX_MESSAGES = 3
MAX_BACKOFF_S = 120.0


class Batch(NamedTuple):
    samples: torch.Tensor | None
    labels: torch.Tensor | None
    keys: np.ndarray | list  # int64 source indices (object where a foreign shard's keys are text)
    bad_count: int = 0
    bad_messages: tuple[str, ...] = ()
    fatal: str = ""
    worker: int = 0  # the (rotated) worker that made it, and where its stream stood after it:
    epoch: int = 0  # `position` units of epoch `epoch` consumed (what a resume skips to; a unit
    # is a sample, a counted run of bad ones, or a storage event),
    position: int = 0
    failures: tuple = ()  # and that epoch's storage failures so far, ((queue step, delivered), ...)
    shard_failures: int = 0  # since the worker's previous batch
    shard_retries: int = 0
    read_bytes: int = 0


class _Bad(NamedTuple):
    message: str
    count: int = 1  # samples: a corrupt chunk is all of its samples (one stream unit)


class _Event(NamedTuple):
    """A storage failure, a retry, or the end (fatal): counted, never a sample."""

    failures: int = 0
    retries: int = 0
    fatal: str = ""
    message: str = ""


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
    chunk_size: int = 1
    num_epochs: int = 0  # 0: endless
    shard_counts: list[int] | None = None  # from index.json: pieces, and a short shard is noticed
    offsets: list[list[int]] | None = None
    start: dict | None = None  # resume: {"rotation": r, "workers": {worker: (epoch, position, failures)}}
    max_shard_retries: int = 8
    retry_backoff_s: float = 2.0
    # Where each worker appends its storage failures as they happen ([epoch, step, delivered]
    # lines): a checkpoint also records those met while reading ahead of the trainer.
    failure_log: str = ""


class ShardStream(torch.utils.data.IterableDataset):
    def __init__(self, spec: StreamSpec):
        super().__init__()
        self.spec = spec
        self.failures: dict[int, list] = {}  # epoch -> this worker's storage failures in it
        self.counter = Counter()

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        loader_worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        spec = self.spec
        start = spec.start or {"rotation": 0, "workers": {}}
        # The DataLoader always asks worker 0 first; after a resume the next batch may be due
        # from another worker, so loader worker i plays worker (i + rotation) % num_workers.
        worker = (loader_worker + start["rotation"]) % num_workers
        first_epoch, skip, *replay = start["workers"].get(worker, (start.get("epoch", 0), 0))
        replay = [tuple(event) for event in (replay[0] if replay else [])]  # (epoch, step, delivered)
        self.log = Path(spec.failure_log) / f"rank{spec.rank}-worker{worker}.jsonl" if spec.failure_log else None
        slot, num_slots = spec.rank * num_workers + worker, spec.world_size * num_workers
        epochs = itertools.count(first_epoch) if spec.num_epochs == 0 else range(first_epoch, spec.num_epochs)
        records = itertools.chain.from_iterable(
            self._numbered(e, worker, slot, num_slots, skip if e == first_epoch else 0,
                           [(step, n) for epoch, step, n in replay if epoch == e]) for e in epochs)
        return _batches(records, spec.batch_per_device, worker, self)

    def _numbered(self, epoch: int, worker: int, slot: int, num_slots: int, skip: int, replay: list):
        """(epoch, position before it, record) for one epoch, from unit `skip` on (a resume
        that stopped inside a block gets the block's remaining rows)."""
        records = self._epoch(epoch, worker, slot, num_slots, replay, skip)
        position = 0
        for record in records:
            size = len(record) if isinstance(record, Block) else 1
            if position + size <= skip:
                position += size
                continue
            if position < skip:
                record, position = record.rows(slice(skip - position, None)), skip
            yield epoch, position, record
            position += len(record) if isinstance(record, Block) else 1
        if position == 0:  # an epoch without a single record: this slot would never make a batch
            yield epoch, 0, _Event(fatal=f"reader slot {slot} of {num_slots} got no sample in epoch {epoch}: the data "
                                         "has fewer samples than reader slots (processes x data.num_workers)")

    def _epoch(self, epoch: int, worker: int, slot: int, num_slots: int, replay: list, skip: int):
        spec = self.spec
        for old in [e for e in self.failures if e < epoch]:
            del self.failures[old]
        self.failures[epoch] = list(replay)
        capacity = capacity_rows(spec.shuffle_buffer, spec.chunk_size)
        protected = skip + held_rows_bound(capacity, spec.chunk_size) if skip else 0
        if spec.shard_counts is not None:
            pieces = slot_pieces(spec.shard_counts, spec.seed, epoch, slot, num_slots)
            records = self._walk(pieces, epoch, dict(replay), protected)
        else:  # a shard pattern: whole shards, or every shard with every num_slots-th sample kept
            shard_ids, by_sample = unindexed_assignment(len(spec.urls), spec.seed, epoch, slot, num_slots)
            records = self._walk([Piece(i, 0, None) for i in shard_ids], epoch, dict(replay), protected)
            if by_sample:
                records = _every(records, slot, num_slots)
        if capacity:
            rng = np.random.default_rng(derive_seed(spec.seed, spec.rank, worker, epoch, SAMPLE_ORDER))
            records = shuffled(records, capacity, rng)
        return records

    def _walk(self, pieces: list[Piece], epoch: int, replay: dict, protected: int = 0):
        """The records of `pieces` in order; a piece whose read fails goes to the back of the
        queue with the samples it delivered removed. A resumed epoch repeats the failures it
        had (`replay`: {queue step: samples delivered}) without waiting, and retries in place
        any new one among its first `protected` units (what the resume skips, plus what the
        shuffle buffer holds), so its records come in the order the uninterrupted run had."""
        spec = self.spec
        queue = collections.deque((piece, 0, 0.0) for piece in pieces)
        produced = 0
        for step in itertools.count():
            if not queue:
                return
            piece, num_failed, not_before_s = queue.popleft()
            if num_failed:
                yield _Event(retries=1)
                produced += 1
                if step > max(replay, default=-1):
                    time.sleep(max(0.0, not_before_s - time.monotonic()))
            limit, in_place, delivered = replay.get(step), produced < protected, 0
            try:
                if limit is not None or in_place:
                    for record in self._in_place(piece, limit):
                        produced += _units(record)
                        yield record
                        if isinstance(record, _Event):  # fatal: the storage never came back
                            return
                    if limit is None:
                        continue
                    raise ReadFailure(f"shard {piece.shard} failed here before the resume")
                for record in self._piece(piece, None):
                    delivered, produced = delivered + _samples_in(record), produced + _units(record)
                    yield record
            except ReadFailure as err:
                if limit is None:
                    self._record_failure(epoch, step, delivered)
                delivered = delivered if limit is None else limit
                if num_failed >= spec.max_shard_retries:
                    yield _Event(fatal=f"{err}; it failed {num_failed + 1} times (deferred between tries; "
                                       f"data.max_shard_retries={spec.max_shard_retries}, data.retry_backoff_s="
                                       f"{spec.retry_backoff_s:g})")
                    return
                yield _Event(failures=1, message=str(err))
                produced += 1
                rest = Piece(piece.shard, piece.start + delivered, piece.stop)
                queue.append((rest, num_failed + 1, time.monotonic() + _backoff(spec, num_failed + 1)))

    def _in_place(self, piece: Piece, limit: int | None):
        """A piece's records (the first `limit`; None: all), retried where they broke off after
        a backoff, without events (which would shift the stream), if the storage fails; a fatal
        event last when it never comes back."""
        delivered = 0
        for attempt in itertools.count(1):
            try:
                rest = Piece(piece.shard, piece.start + delivered, piece.stop)
                for record in self._piece(rest, None if limit is None else limit - delivered):
                    delivered += _samples_in(record)
                    yield record
                return
            except ReadFailure as err:
                if attempt > self.spec.max_shard_retries:
                    yield _Event(fatal=f"{err}; it failed {attempt} times in a row while a resumed epoch was "
                                       f"replayed (data.max_shard_retries={self.spec.max_shard_retries})")
                    return
                time.sleep(_backoff(self.spec, attempt))

    def _piece(self, piece: Piece, limit: int | None):
        """A piece's records (its first `limit` samples): Blocks, and _Bad for bad samples."""
        spec = self.spec
        if limit is not None:
            piece = Piece(piece.shard, piece.start, piece.start + limit)
        if piece.stop == piece.start:
            return
        offsets = spec.offsets[piece.shard] if spec.offsets else None
        layout = Layout(spec.chunk_size, spec.shard_counts[piece.shard] if spec.shard_counts else None)
        for record in read_piece(spec.urls[piece.shard], piece, offsets, spec.shape, spec.dtype, spec.num_classes,
                                 self.counter, layout=layout):
            yield _Bad(str(record), record.count) if isinstance(record, BadSample) else record

    def _record_failure(self, epoch: int, step: int, delivered: int) -> None:
        self.failures[epoch].append((step, delivered))
        if self.log is not None:
            self.log.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log, "a") as log:
                log.write(json.dumps([epoch, step, delivered]) + "\n")


def stream_failures(spec: StreamSpec, worker: int, epoch: int, known: list) -> list[list[int]]:
    """[epoch, step, delivered] of every storage failure this worker met in epoch `epoch` or
    later: those its last batch carried (`known`: (step, delivered) of `epoch`), those replayed
    from the checkpoint this leg started from, and those its log holds (met reading ahead)."""
    start = (spec.start or {}).get("workers", {}).get(worker, ())
    events = {(epoch, *map(int, e)) for e in known}
    events |= {tuple(map(int, e)) for e in (start[2] if len(start) > 2 else [])}
    log = Path(spec.failure_log) / f"rank{spec.rank}-worker{worker}.jsonl" if spec.failure_log else None
    if log is not None and log.is_file():
        events |= {tuple(event) for event in map(_event, log.read_text().splitlines()) if event}
    return [list(e) for e in sorted(events) if e[0] >= epoch]


def _event(line: str) -> list[int] | None:
    """One failure-log line; None for a line a worker is still writing."""
    try:
        event = json.loads(line)
    except ValueError:
        return None
    return event if isinstance(event, list) and len(event) == 3 else None


def _backoff(spec: StreamSpec, num_failed: int) -> float:
    return min(MAX_BACKOFF_S, spec.retry_backoff_s * 2 ** (num_failed - 1))


def _units(record) -> int:
    """Stream units a walk record takes: a Block its rows; a run of bad samples or an event, one."""
    return len(record) if isinstance(record, Block) else 1


def _samples_in(record) -> int:
    return len(record) if isinstance(record, Block) else record.count if isinstance(record, _Bad) else 0


def _every(records, first: int, step: int):
    """Every step-th sample from the first-th on (bad ones included in the count); events pass."""
    index = 0
    for record in records:
        if isinstance(record, _Event):
            yield record
            continue
        count = _samples_in(record)
        kept = np.flatnonzero((np.arange(index, index + count) % step) == first)
        index += count
        if len(kept) == count:
            yield record
        elif len(kept):
            yield record.rows(kept) if isinstance(record, Block) else _Bad(record.message, len(kept))


def _batches(numbered_records, batch_size: int, worker: int, stream: ShardStream):
    """Full batches of good samples, cut from the blocks as they come; bad ones are counted into
    the next batch (the rest dropped at the end)."""
    parts, rows, bad_count, messages, bad_in_a_row = [], 0, 0, [], 0
    events = {"failures": 0, "retries": 0}
    for epoch, position, record in numbered_records:
        if isinstance(record, _Event):
            if record.fatal:
                yield Batch(None, None, [], bad_count, tuple(messages), fatal=f"shard unreadable: {record.fatal}",
                            shard_failures=events["failures"] + 1, shard_retries=events["retries"])
                return
            events["failures"] += record.failures
            events["retries"] += record.retries
            continue
        if isinstance(record, _Bad):
            bad_count, bad_in_a_row = bad_count + record.count, bad_in_a_row + 1  # runs: one corrupt chunk is one
            if len(messages) < MAX_MESSAGES:
                messages.append(record.message)
            if bad_in_a_row >= MAX_BAD_IN_A_ROW:
                yield Batch(None, None, [], bad_count, tuple(messages),
                            fatal=f"{bad_in_a_row} bad samples in a row and no good one, e.g. {messages[0]}")
                return
            continue
        bad_in_a_row, start = 0, 0
        while start < len(record):
            take = min(batch_size - rows, len(record) - start)
            parts.append(record.rows(slice(start, start + take)) if take < len(record) else record)
            rows, start = rows + take, start + take
            if rows < batch_size:
                continue
            block = concatenate(parts)
            samples = block.samples if block.samples.flags.writeable else block.samples.copy()
            yield Batch(torch.from_numpy(samples), torch.from_numpy(block.labels), block.keys,
                        bad_count, tuple(messages), worker=worker, epoch=epoch, position=position + start,
                        failures=tuple(stream.failures.get(epoch, ())), shard_failures=events["failures"],
                        shard_retries=events["retries"], read_bytes=stream.counter.bytes)
            parts, rows, bad_count, messages = [], 0, 0, []
            events = {"failures": 0, "retries": 0}
            stream.counter.bytes = 0
    if bad_count:  # a finite pass that ends on bad samples still reports them
        yield Batch(None, None, [], bad_count, tuple(messages))


def _as_is(batch):
    # Batches are collated in the workers; the default collate would walk them again.
    return batch


class _Loader(torch.utils.data.DataLoader):
    def _get_iterator(self):
        iterator = super()._get_iterator()
        if self.num_workers > 0:  # its workers ignore SIGTERM: see shut_down_at_exit
            shut_down_at_exit(iterator)
        return iterator


def make_loader(info: DatasetInfo, batch_per_device: int, seed: int, rank: int, num_workers: int,
                shuffle_buffer: int, pin_memory: bool = False, world_size: int = 1,
                conditional: bool = False, num_epochs: int = 0, start: dict | None = None,
                max_shard_retries: int = 8, retry_backoff_s: float = 2.0, failure_log: str = "",
                resident: str = "off", device=None):
    """This rank's loader of `Batch`es: endless (num_epochs=0), or a finite pass of `num_epochs`.
    resident "host" or "device": the whole dataset in one array there (resident.py) and no
    worker processes; "off": streamed from the shards by `num_workers` workers."""
    if resident != "off":
        from gan_dist.data.resident import ResidentLoader

        return ResidentLoader(info, batch_per_device, seed, rank, world_size, conditional, num_epochs, start,
                              max_shard_retries, retry_backoff_s, device if resident == "device" else None,
                              pin_memory)
    num_slots = world_size * max(1, num_workers)
    if info.shard_counts is not None and info.count < num_slots:  # an empty slot would never yield a batch
        raise UserError(f"the dataset has {info.count} samples, fewer than the {num_slots} reader slots "
                        f"({world_size} processes x {max(1, num_workers)} data.num_workers): lower data.num_workers")
    spec = StreamSpec(info.urls, info.shape, info.dtype, info.num_classes if conditional else 0,
                      batch_per_device, seed, rank, world_size, shuffle_buffer, info.chunk_size, num_epochs,
                      info.shard_counts, info.offsets, start, max_shard_retries, retry_backoff_s, failure_log)
    loader = _Loader(
        ShardStream(spec), batch_size=None, collate_fn=_as_is, num_workers=num_workers,
        generator=torch.Generator().manual_seed(derive_seed(seed, rank, LOADER)),
        persistent_workers=num_workers > 0 and num_epochs == 0, pin_memory=pin_memory,
        worker_init_fn=ignore_stop_signals if num_workers > 0 else None,
        prefetch_factor=4 if num_workers > 0 else None,
    )
    loader.data_mode = STREAM_FORMAT
    return loader if num_epochs == 0 else FinitePass(loader, finite_batches(info, spec, num_workers))


def finite_batches(info: DatasetInfo, spec: StreamSpec, num_workers: int) -> int:
    """Batches every rank yields in a finite pass: the smallest rank's count (from the plan)."""
    if info.shard_counts is None:
        raise UserError("a finite pass over the data needs its index.json (give data.path as the dataset directory)")
    from gan_dist.data.plan import plan_epoch

    slots_per_rank = max(1, num_workers)
    num_slots = spec.world_size * slots_per_rank
    per_slot = [0] * num_slots
    for epoch in range(spec.num_epochs):
        for slot, pieces in enumerate(plan_epoch(info.shard_counts, spec.seed, epoch, num_slots)):
            per_slot[slot] += sum(p.size for p in pieces)
    # Each slot's batches run on across epochs (the stream is one sequence per worker).
    return min(sum(n // spec.batch_per_device for n in per_slot[r * slots_per_rank:(r + 1) * slots_per_rank])
               for r in range(spec.world_size))


class FinitePass:
    """A finite pass cut to the same number of batches on every rank, so no rank waits on another."""

    def __init__(self, loader, num_batches: int):
        self.loader, self.num_batches = loader, num_batches

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self):
        full = 0
        for batch in self.loader:
            if len(batch.keys) and full == self.num_batches:
                return
            full += bool(len(batch.keys))
            yield batch  # batches of bad samples only are passed on, not counted
