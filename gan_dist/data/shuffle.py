"""A reader slot's shuffle buffer, over blocks of rows rather than single samples.

The stream (stream.py) hands over `Block`s: a chunk's rows, or (per-sample data) one row at a
time. The buffer holds `capacity` rows in preallocated arrays; every block that comes in
pushes out as many rows as it brought, drawn uniformly from everything held. Work per block
is a few numpy calls, whatever its size, so a chunk of 128 rows costs about what one row
used to. With chunked data the capacity is at least 8 chunks (`capacity_rows`): each block
that goes out mixes rows of 8 or more chunks, so the images that share a chunk on disk do
not share a batch every epoch. One-row blocks are gathered 32 at a time before they enter,
which keeps per-sample data off numpy's per-call overhead.

Rows go out in an order that is a function of the input and the generator alone, so a
resumed epoch replays it exactly. Anything that is not a Block (a counted bad sample, a
storage event) passes straight through at the point it came in.
"""

from __future__ import annotations

import numpy as np

from gan_dist.data.samples import Block, concatenate

MIN_CHUNKS_MIXED = 8
GATHER_ROWS = 32


def capacity_rows(shuffle_buffer: int, chunk_size: int) -> int:
    """Rows a slot's buffer holds: data.shuffle_buffer, and at least 8 chunks (1: no shuffle)."""
    if shuffle_buffer <= 1:
        return 0
    return max(shuffle_buffer, MIN_CHUNKS_MIXED * chunk_size if chunk_size > 1 else 0)


def held_rows_bound(capacity: int, chunk_size: int) -> int:
    """At most this many rows have come in but not gone out at any time."""
    return capacity + 2 * max(chunk_size, GATHER_ROWS)


def shuffled(records, capacity: int, rng: np.random.Generator):
    """The records with the rows of their Blocks shuffled through a buffer of `capacity` rows."""
    pool, pending, pending_rows = _Pool(capacity, rng), [], 0
    for record in records:
        if not isinstance(record, Block):
            if pending:
                yield from pool.add(concatenate(pending))
                pending, pending_rows = [], 0
            yield record
            continue
        pending.append(record)
        pending_rows += len(record)
        if pending_rows >= GATHER_ROWS:
            yield from pool.add(concatenate(pending))
            pending, pending_rows = [], 0
    if pending:
        yield from pool.add(concatenate(pending))
    yield from pool.drain()


class _Pool:
    """Rows held in arrays of fixed capacity: a block in, as many random rows out."""

    def __init__(self, capacity: int, rng: np.random.Generator):
        self.capacity, self.rng = capacity, rng
        self.arrays: list[np.ndarray] | None = None  # samples, labels, keys
        self.size = 0

    def add(self, block: Block):
        self._make_room(block, self.size + len(block))
        for array, rows in zip(self.arrays, (block.samples, block.labels, block.keys), strict=True):
            array[self.size:self.size + len(block)] = rows
        self.size += len(block)
        if self.size > self.capacity:
            yield self._draw(self.size - self.capacity)

    def drain(self):
        if self.size:
            order = self.rng.permutation(self.size)
            yield Block(*(array[order] for array in self.arrays))
            self.size = 0

    def _make_room(self, block: Block, rows: int) -> None:
        if self.arrays is None:
            size = max(rows, self.capacity + len(block))
            self.arrays = [np.empty((size, *a.shape[1:]), a.dtype) for a in (block.samples, block.labels, block.keys)]
        elif rows > len(self.arrays[0]):
            grown = []
            for array in self.arrays:
                bigger = np.empty((rows, *array.shape[1:]), array.dtype)
                bigger[:self.size] = array[:self.size]
                grown.append(bigger)
            self.arrays = grown
        if block.keys.dtype != self.arrays[2].dtype:  # text keys among numbers: keep them all as objects
            self.arrays[2] = self.arrays[2].astype(object)

    def _draw(self, count: int) -> Block:
        """`count` rows drawn uniformly without replacement; the last rows fill their places."""
        size = self.size
        if count == 1:
            index = np.array([self.rng.integers(size)])
            holes, movers = (index, np.array([size - 1])) if index[0] != size - 1 else (index[:0], index[:0])
        else:
            index = self.rng.choice(size, count, replace=False)
            taken = np.zeros(size, dtype=bool)
            taken[index] = True
            holes = np.flatnonzero(taken[:size - count])
            movers = size - count + np.flatnonzero(~taken[size - count:])
        out = Block(*(array[index] for array in self.arrays))
        for array in self.arrays:
            array[holes] = array[movers]
        self.size = size - count
        return out
