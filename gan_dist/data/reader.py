"""Reading one piece of a shard (samples [start, stop)) from a file, an http(s) server or a command.

A piece comes out as `Block`s of decoded rows (one per chunk, or one row per sample of the
per-sample layout) and `BadSample`s counting the samples that cannot be used, in order.
With index.json's byte offsets (one per tar entry: a sample, or a chunk of chunk_size) a
local piece is one seek and a remote one an HTTP Range request: the reader pulls exactly the
entries that hold the piece, and keeps the piece's rows of the first and last chunk. Without offsets (an index written by an
older gan_dist) a local shard is walked header by header, seeking over the samples before the
piece; a stream that cannot seek (pipe:, or a server that ignores Range) is read from the
shard's start and the part before the piece discarded undecoded. Every byte pulled from
storage is counted, so the read-once property can be measured.

A storage failure (an OSError, a command's non-zero exit, a connection dropped mid-body, or
fewer samples than the index lists) raises `ReadFailure` after the samples already delivered:
the stream (stream.py) defers the rest of the piece and tries again later.
"""

from __future__ import annotations

import itertools
import subprocess
import tarfile
import urllib.request
from pathlib import Path
from typing import NamedTuple

import numpy as np

from gan_dist.data.plan import Piece
from gan_dist.data.samples import BadSample, decode, decode_chunk, is_chunk, sample_block

HTTP_TIMEOUT_S = 60  # a transfer that stalls this long fails (and is retried later)


class ReadFailure(Exception):
    """The storage failed while reading a piece (maybe transiently)."""


class Counter:
    """Bytes pulled from storage by one reader slot."""

    def __init__(self):
        self.bytes = 0


class _Limited:
    """A read-only view of the next `limit` bytes of a stream (None: to its end), counted."""

    def __init__(self, raw, limit: int | None, counter: Counter):
        self.raw, self.left, self.counter = raw, limit, counter

    def read(self, size: int = -1) -> bytes:
        if self.left is not None:
            size = self.left if size < 0 else min(size, self.left)
            if size == 0:
                return b""
        data = self.raw.read(size)
        self.counter.bytes += len(data)
        if self.left is not None:
            self.left -= len(data)
        return data

    def discard(self, size: int) -> None:
        while size > 0:
            data = self.raw.read(min(size, 1 << 20))
            if not data:
                raise ReadFailure(f"the stream ended {size} bytes before the piece")
            self.counter.bytes += len(data)
            size -= len(data)


def _split_name(name: str) -> tuple[str, str]:
    """webdataset's convention: the key is the path up to the first dot of the file name."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext


def _samples(members):
    """Raw samples {"__key__": key, ext: bytes, ...} from consecutive (name, bytes) members."""
    current: dict = {}
    for name, data in members:
        key, ext = _split_name(name)
        if current and current["__key__"] != key:
            yield current
            current = {}
        current.setdefault("__key__", key)
        current[ext.lower()] = data
    if current:
        yield current


def _stream_members(fileobj):
    """(name, bytes) of a tar stream; a stream cut at a member boundary simply ends."""
    with tarfile.open(fileobj=fileobj, mode="r|") as tar:
        for member in tar:
            if member.isfile():
                yield member.name, tar.extractfile(member).read()


def _seek_members(path: str, skip: int, counter: Counter):
    """(name, bytes) of a local tar after its first `skip` samples, seeking over their data."""
    with open(path, "rb") as raw:
        counted = _CountedFile(raw, counter)
        with tarfile.open(fileobj=counted, mode="r:") as tar:
            key, seen = None, 0
            for member in tar:
                if not member.isfile():
                    continue
                name_key = _split_name(member.name)[0]
                if name_key != key:
                    key, seen = name_key, seen + 1
                if seen > skip:
                    yield member.name, tar.extractfile(member).read()


class _CountedFile:
    """A seekable file whose reads are counted (tarfile seeks over what it does not read)."""

    def __init__(self, raw, counter: Counter):
        self.raw, self.counter = raw, counter

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.counter.bytes += len(data)
        return data

    def seek(self, *args):
        return self.raw.seek(*args)

    def tell(self) -> int:
        return self.raw.tell()


def _http_open(url: str, first_byte: int, end_byte: int | None):
    """(response, bytes to discard): a Range request; a server that ignores it sends it all."""
    headers = {}
    if first_byte or end_byte is not None:
        headers["Range"] = f"bytes={first_byte}-{'' if end_byte is None else end_byte - 1}"
    response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=HTTP_TIMEOUT_S)
    return response, 0 if response.status == 206 else first_byte


def supports_range(url: str) -> bool:
    """Whether an http(s) server answers a Range request with only that range (python -m
    http.server, for one, sends the whole file)."""
    try:
        response, discard = _http_open(url, 1, 2)
        response.close()
    except OSError:
        return True  # unreachable now: the reads will say so
    return discard == 0


def _members(url: str, piece: Piece, offsets: list[int] | None, counter: Counter):
    """(name, bytes) of the piece's tar members, plus the number of samples still to skip."""
    end = offsets[piece.stop] if offsets and piece.stop is not None else None
    first = offsets[piece.start] if offsets else 0
    skip = 0 if offsets else piece.start
    if url.startswith("pipe:"):
        return _pipe_members(url[5:], first, None if end is None else end - first, counter), skip
    if url.startswith(("http:", "https:")):
        response, discard = _http_open(url, first, end)
        try:
            stream = _Limited(response, None if end is None else end - first + discard, counter)
            stream.discard(discard)
        except BaseException:
            response.close()
            raise
        return _closing(_stream_members(stream), response), skip
    if offsets:
        raw = open(url, "rb")  # noqa: SIM115 - closed by _closing when the piece ends
        raw.seek(first)
        return _closing(_stream_members(_Limited(raw, end - first, counter)), raw), 0
    return _seek_members(url, skip, counter), 0


def _closing(members, resource):
    try:
        yield from members
    finally:
        resource.close()


def _pipe_members(command: str, discard: int, limit: int | None, counter: Counter):
    import tempfile

    # stderr to a file: a command that writes much to a pipe nobody reads would block.
    with tempfile.TemporaryFile() as errors:
        process = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, stderr=errors)
        finished = False
        try:
            stream = _Limited(process.stdout, None if limit is None else discard + limit, counter)
            stream.discard(discard)
            yield from _stream_members(stream)
            finished = limit is None
        finally:
            if not finished:  # the piece ends before the shard does (or the reader stopped): not wanted
                process.kill()
            returncode = process.wait() if finished else (process.wait(), 0)[1]  # killed on purpose: no error
            process.stdout.close()
        if returncode:
            errors.seek(0)
            lines = errors.read().decode(errors="replace").strip().splitlines()
            raise ReadFailure(f"command exited with {returncode}: {lines[-1][:200] if lines else ''}")


class Layout(NamedTuple):
    """How samples are stored in a shard: chunk_size samples per tar entry (1: per sample),
    `count` of them in all (None: unknown, a shard pattern without index.json)."""

    chunk_size: int = 1
    count: int | None = None

    def entries(self, piece: Piece) -> Piece:
        """The tar entries that hold the piece's samples."""
        stop = None if piece.stop is None else -(-piece.stop // self.chunk_size)
        return Piece(piece.shard, piece.start // self.chunk_size, stop)

    def rows_of(self, entry: int) -> int | None:
        if self.chunk_size == 1 or self.count is None:
            return None
        return min(self.chunk_size, self.count - entry * self.chunk_size)


PER_SAMPLE = Layout()


def read_piece(url: str, piece: Piece, offsets: list[int] | None, shape, dtype, num_classes: int,
               counter: Counter, select=None, layout: Layout = PER_SAMPLE):
    """`Block`s and `BadSample`s of the piece's samples, in order; `ReadFailure` once the storage
    fails or the piece comes up short. piece.stop None: to the shard's end (a dataset without
    counts). Per-sample layout only: `select(sample index in the shard)` False gives None in
    that sample's place, undecoded."""
    delivered, last_key, members = 0, "(none)", None
    wanted = None if piece.stop is None else piece.stop - piece.start
    entries = layout.entries(piece)
    position = entries.start * layout.chunk_size  # shard index of the next entry's first sample
    try:
        members, skip = _members(url, entries, offsets, counter)
        for raw in _samples(members):
            if skip:
                skip -= 1
                continue
            last_key = raw["__key__"]
            if is_chunk(raw):
                records, num_rows = _chunk_records(raw, position, piece, url, shape, dtype, num_classes, layout)
            else:
                records, num_rows = [_sample_record(raw, url, shape, dtype, num_classes, select,
                                                    piece.start + delivered)], 1
            for record in records:
                delivered += size_of(record)
                yield record
            position += num_rows
            if wanted is not None and delivered >= wanted:
                return
    except ReadFailure as err:
        raise ReadFailure(f"{_name(url)}: {err} after key {last_key}") from None
    except Exception as err:  # noqa: BLE001 - tarfile, socket, http and OS errors all mean the storage failed
        reason = str(err).splitlines()[0][:200] if str(err) else ""
        raise ReadFailure(f"{_name(url)}: unreadable after key {last_key} ({type(err).__name__}: {reason})") from None
    finally:  # also when the consumer stops early: the file, socket or command goes now
        if members is not None:
            members.close()
    if wanted is not None and delivered < wanted:
        raise ReadFailure(f"{_name(url)}: truncated, {delivered} of the {wanted} samples wanted after key {last_key}")


def size_of(record) -> int:
    """Samples a record stands for: None (not selected) one, a BadSample its count, a Block its rows."""
    return 1 if record is None else record.count if isinstance(record, BadSample) else len(record)


def _sample_record(raw: dict, url: str, shape, dtype, num_classes: int, select, index: int):
    """One per-sample entry: a one-row Block, a BadSample, or None (not selected)."""
    if select is not None and not select(index):
        return None
    try:
        return sample_block(*decode(raw, shape, dtype, num_classes))
    except BadSample as err:
        return BadSample(f"{_name(url)} key {raw['__key__']}: {err}")


def _chunk_records(raw: dict, position: int, piece: Piece, url: str, shape, dtype, num_classes: int,
                   layout: Layout) -> tuple[list, int]:
    """(records, rows the entry holds) for the piece's rows [low, high) of a chunk entry whose
    first sample is shard sample `position`: good runs as Blocks, bad runs as BadSamples."""
    expected = layout.rows_of(position // layout.chunk_size) if layout.chunk_size > 1 else None
    block, bad, message = decode_chunk(raw, shape, dtype, num_classes, expected)
    num_rows = expected if expected is not None else (len(block) if block is not None else 1)
    low = max(piece.start, position) - position
    high = num_rows if piece.stop is None else min(piece.stop, position + num_rows) - position
    where = f"{_name(url)} chunk {raw['__key__']}"
    if block is None:
        return [BadSample(f"{where}: {message}", high - low)], num_rows
    if bad is None:
        return [block.rows(slice(low, high)) if (low, high) != (0, len(block)) else block], num_rows
    records, mask = [], bad[low:high]
    edges = [0, *(np.flatnonzero(np.diff(mask.astype(np.int8))) + 1).tolist(), high - low]
    for a, b in itertools.pairwise(edges):
        records.append(BadSample(f"{where}: {message}", b - a) if mask[a] else block.rows(slice(low + a, low + b)))
    return records, num_rows


def per_sample(records, first: int, select=None):
    """read_piece's records one sample at a time, from shard sample `first`: (array, label, key),
    a BadSample, or None where `select(index)` is False."""
    index = first
    for record in records:
        if record is None or isinstance(record, BadSample):
            count = 1 if record is None else record.count
            yield from [record] * count
            index += count
            continue
        for row in range(len(record)):
            wanted = select is None or select(index)
            yield (record.samples[row], int(record.labels[row]), record.keys[row]) if wanted else None
            index += 1


def _name(url: str) -> str:
    """The shard as the user knows it (a command is shown without its options)."""
    return url.rsplit(" ", 1)[-1] if url.startswith("pipe:") else url if "://" in url else str(Path(url))


def read_retrying(url: str, piece: Piece, offsets: list[int] | None, shape, dtype, num_classes: int,
                  counter: Counter, select=None, retries: int = 3, backoff_s: float = 2.0,
                  layout: Layout = PER_SAMPLE):
    """read_piece one sample at a time (per_sample), resumed where it broke off after a
    doubling backoff, up to `retries` times (for readers that need every sample and cannot
    defer, such as evaluation)."""
    import time

    delivered = 0
    for attempt in range(retries + 1):
        try:
            rest = Piece(piece.shard, piece.start + delivered, piece.stop)
            records = read_piece(url, rest, offsets, shape, dtype, num_classes, counter, select, layout)
            for record in per_sample(records, rest.start, select):
                delivered += 1
                yield record
            return
        except ReadFailure:
            if attempt == retries:
                raise
            time.sleep(backoff_s * 2**attempt)
