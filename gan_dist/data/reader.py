"""Reading one piece of a shard (samples [start, stop)) from a file, an http(s) server or a command.

With index.json's byte offsets a local piece is one seek and a remote one an HTTP Range
request: the reader pulls exactly the piece's bytes. Without offsets (an index written by an
older gan_dist) a local shard is walked header by header, seeking over the samples before the
piece; a stream that cannot seek (pipe:, or a server that ignores Range) is read from the
shard's start and the part before the piece discarded undecoded. Every byte pulled from
storage is counted, so the read-once property can be measured.

A storage failure (an OSError, a command's non-zero exit, a connection dropped mid-body, or
fewer samples than the index lists) raises `ReadFailure` after the samples already delivered:
the stream (stream.py) defers the rest of the piece and tries again later.
"""

from __future__ import annotations

import subprocess
import tarfile
import urllib.request
from pathlib import Path

from gan_dist.data.plan import Piece
from gan_dist.data.samples import BadSample, decode

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


def read_piece(url: str, piece: Piece, offsets: list[int] | None, shape, dtype, num_classes: int,
               counter: Counter, select=None):
    """Decoded (array, label, key) tuples of the piece, a `BadSample` instance for each sample
    that cannot be used; `ReadFailure` once the storage fails or the piece comes up short.
    piece.stop None: to the shard's end (a dataset without counts). `select(sample index in
    the shard)` False: None in that sample's place, undecoded."""
    delivered, last_key, members = 0, "(none)", None
    wanted = None if piece.stop is None else piece.stop - piece.start
    try:
        members, skip = _members(url, piece, offsets, counter)
        for raw in _samples(members):
            if skip:
                skip -= 1
                continue
            try:
                record = None if select is not None and not select(piece.start + delivered) else \
                    decode(raw, shape, dtype, num_classes)
            except BadSample as err:
                record = BadSample(f"{_name(url)} key {raw['__key__']}: {err}")
            delivered += 1
            last_key = raw["__key__"]
            yield record
            if delivered == wanted:
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


def _name(url: str) -> str:
    """The shard as the user knows it (a command is shown without its options)."""
    return url.rsplit(" ", 1)[-1] if url.startswith("pipe:") else url if "://" in url else str(Path(url))


def read_retrying(url: str, piece: Piece, offsets: list[int] | None, shape, dtype, num_classes: int,
                  counter: Counter, select=None, retries: int = 3, backoff_s: float = 2.0):
    """read_piece, resumed where it broke off after a doubling backoff, up to `retries` times
    (for readers that need every sample and cannot defer, such as evaluation)."""
    import time

    delivered = 0
    for attempt in range(retries + 1):
        try:
            rest = Piece(piece.shard, piece.start + delivered, piece.stop)
            for record in read_piece(url, rest, offsets, shape, dtype, num_classes, counter, select):
                delivered += 1
                yield record
            return
        except ReadFailure:
            if attempt == retries:
                raise
            time.sleep(backoff_s * 2**attempt)
