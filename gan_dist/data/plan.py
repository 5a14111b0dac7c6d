"""One epoch of reading, dealt to every reader slot: each sample once, sizes within one, no idle slot.

A slot is one loader worker of one GLOBAL rank: slot = rank * num_workers + worker. Epoch e
permutes the shards with a seed of (train.seed, e) that every rank shares, lays their samples
end to end and cuts that sequence into num_slots contiguous runs whose lengths differ by at
most one sample. A run is a few `Piece`s (shard, first sample, end sample); with index.json's
byte offsets each piece is one seek or one HTTP Range request, so an epoch reads every byte
of the dataset once whatever the ratio of shards to slots: 1,000 shards on 128 slots give
every slot 7.8 shards' worth, 3 shards on 8 slots give every slot 3/8 of a shard.

Every rank and worker computes the same plan from (shard counts, seed, epoch, num_slots)
alone, so nothing is exchanged. Datasets without counts (a shard pattern with no index.json)
cannot be cut inside a shard; `unindexed_assignment` deals them whole, and with fewer shards
than slots every slot reads every shard and keeps every num_slots-th sample.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from gan_dist.seeds import derive_seed

SHARD_ORDER = 0  # seed purpose (stream.py numbers the others)


class Piece(NamedTuple):
    """Samples [start, stop) of shard `shard`, in the shard's order."""

    shard: int
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


def shard_order(num_shards: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng(derive_seed(seed, epoch, SHARD_ORDER)).permutation(num_shards)


def plan_epoch(counts: list[int], seed: int, epoch: int, num_slots: int) -> list[list[Piece]]:
    """Every slot's pieces for one epoch (O(shards + slots))."""
    total = int(sum(counts))
    bounds = [slot * total // num_slots for slot in range(num_slots + 1)]
    plan: list[list[Piece]] = [[] for _ in range(num_slots)]
    slot, begin = 0, 0
    for shard in shard_order(len(counts), seed, epoch).tolist():
        end = begin + int(counts[shard])
        low = begin
        while low < end:
            while bounds[slot + 1] <= low:
                slot += 1
            high = min(end, bounds[slot + 1])
            plan[slot].append(Piece(shard, low - begin, high - begin))
            low = high
        begin = end
    return plan


def slot_pieces(counts: list[int], seed: int, epoch: int, slot: int, num_slots: int) -> list[Piece]:
    return plan_epoch(counts, seed, epoch, num_slots)[slot]


def unindexed_assignment(num_shards: int, seed: int, epoch: int, slot: int,
                         num_slots: int) -> tuple[list[int], bool]:
    """Without counts: (whole shards to read, whether to keep only every num_slots-th sample)."""
    order = shard_order(num_shards, seed, epoch)
    if num_shards >= num_slots:
        return [int(i) for i in order[slot::num_slots]], False
    return [int(i) for i in order], True


def read_multiplication(num_shards: int, counts: list[int] | None, offsets: list[list[int]] | None,
                        num_slots: int, seekable: bool, chunk_size: int = 1) -> float:
    """Bytes an epoch reads over the dataset's bytes. 1.0 for seekable indexed data (give or
    take the chunks cut between two slots). A stream that cannot seek (pipe:, or http without
    offsets) reads each piece's shard from its start; without counts, fewer shards than slots
    make every slot read every shard."""
    if counts is None:
        return float(num_slots) if num_shards < num_slots else 1.0
    if seekable:
        return 1.0
    plan = plan_epoch(counts, 0, 0, num_slots)

    def start(piece: Piece) -> int:  # byte where the entry holding the piece's first sample starts
        return offsets[piece.shard][piece.start // chunk_size] if offsets else piece.start

    def end(piece: Piece) -> int:  # and where the entry holding its last sample ends
        return offsets[piece.shard][-(-piece.stop // chunk_size)] if offsets else piece.stop

    useful = sum(end(p) - start(p) for pieces in plan for p in pieces)
    read = sum(end(p) for pieces in plan for p in pieces)
    return read / max(1, useful)
