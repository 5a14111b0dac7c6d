"""Samples and their features, split over the processes by GLOBAL rank and gathered on rank 0.

Generated samples come in chunks whose latents depend only on (seed, chunk index), and
chunk c goes to rank c mod world_size. Real samples are named by their index in the
dataset's order (index.json's shards end to end); a `Selection` says which of them form a
reference, and each rank reads a contiguous range of them with ranged reads (reader.py),
extracting features a batch at a time, so memory holds features, never the images. One
gather and a sort by index then give rank 0 the features in the same order whatever the
number of processes; rank 0 computes the numbers and sends them to the others.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch

from gan_dist.data.index import DatasetInfo
from gan_dist.data.plan import Piece
from gan_dist.data.reader import Counter, ReadFailure, read_retrying
from gan_dist.errors import UserError
from gan_dist.progress import ProgressFactory, task_progress
from gan_dist.seeds import derive_seed
from gan_dist.visual import to_uint8

Extract = Callable[[torch.Tensor], dict[str, torch.Tensor]]
REFERENCE_PURPOSE = 11  # seed purpose of a random reference subset
GATHER_ROWS = 4096  # rows per rank per gather call: 4096 x 2048 Inception features = 32 MiB


class Selection(NamedTuple):
    """Which real samples (by dataset index) a reference holds, and how that was chosen."""

    rule: str  # part of cache keys and of the result's "reference" note
    end: int  # only indices below this are read
    mask: np.ndarray | None = None  # bool per index < end; None: all of them


def reference_selection(info: DatasetInfo, num: int, seed: int) -> Selection:
    """All samples (num 0 or >= count: fid50k_full), else num of them: the first num of a
    dataset shuffled at prepare time (only those shards are read), a seeded random num otherwise."""
    if not info.shard_counts:
        raise UserError("FID, KID and cls read the real samples through the dataset's index.json; point "
                        "data.path (or --data) at the prepared dataset directory, not a shard pattern")
    count = info.count
    if num <= 0 or num >= count:
        return Selection(f"all {count}", count)
    if info.order == "shuffled":
        return Selection(f"first {num} of {count}, shuffled at prepare time", num)
    rng = np.random.default_rng(derive_seed(seed, REFERENCE_PURPOSE))
    mask = np.zeros(count, dtype=bool)
    mask[rng.choice(count, num, replace=False)] = True
    return Selection(f"random {num} of {count}, seed {seed}", count, mask)


class Rows:
    """Per-sample outputs gathered into buffers allocated once, at the first batch, for every
    row expected. Appending small tensors between large per-batch temporaries fragments the
    heap instead: building a 50k reference then kept about 570 MiB more resident than one
    batch (bench/reference_memory.py), though only 10 MiB of features were alive."""

    def __init__(self, expected: int):
        self.expected, self.filled = expected, 0
        self.buffers: dict[str, torch.Tensor] = {}

    def add(self, out: dict[str, torch.Tensor]) -> None:
        count = len(next(iter(out.values())))
        if not self.buffers:
            self.buffers = {k: torch.empty((self.expected, *v.shape[1:]), dtype=v.dtype) for k, v in out.items()}
        for name, value in out.items():
            self.buffers[name][self.filled:self.filled + count] = value
        self.filled += count

    def outputs(self) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
        """(keys, outputs) as gather_ordered takes them: nothing when no row came."""
        if not self.filled:
            return [], []
        rows = {name: buffer[:self.filled] for name, buffer in self.buffers.items()}
        return [rows.pop("key")], [rows]


def dataset_key(info: DatasetInfo, selection: Selection | None = None) -> str:
    """Names a dataset's content (its shards' sha256s) and a selection of it, for caches."""
    import hashlib

    text = f"{info.identity()['sha256']}|{selection.rule if selection else ''}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def chunk_latents(chunk: int, size: int, latent_dim: int, seed: int) -> torch.Tensor:
    return torch.randn(size, latent_dim, generator=torch.Generator().manual_seed(seed * 1_000_003 + chunk))


@torch.no_grad()
def generated(G, latent_dim: int, num_classes: int, num: int, batch: int, seed: int, rank: int, world_size: int,
              device, extract: Extract | None, progress: ProgressFactory | None = None) -> dict[str, torch.Tensor]:
    """Features of `num` samples of G (the raw samples if `extract` is None), on rank 0;
    `progress(total, unit)` counts this rank's samples.

    Images are quantised to uint8 first, as stored data is; 2-D points are passed as they are."""
    chunks = range(rank, -(-num // batch), world_size)
    rows = Rows(sum(min(batch, num - chunk * batch) for chunk in chunks))
    with (progress or _quiet)(rows.expected, "samples") as shown:
        for chunk in chunks:
            first = chunk * batch
            size = min(batch, num - first)
            z = chunk_latents(chunk, size, latent_dim, seed).to(device)
            labels = (torch.arange(first, first + size, device=device) % num_classes) if num_classes else None
            samples = G(z, labels)
            if samples.dim() == 4:
                samples = to_uint8(samples)
            out = extract(samples) if extract else {"samples": samples.float()}
            rows.add({**{k: v.cpu() for k, v in out.items()}, "key": torch.arange(first, first + size)})
            shown.advance(size)
    keys, outputs = rows.outputs()
    template = None
    if not outputs:  # more ranks than chunks: this one only learns the output widths
        probe = G(chunk_latents(0, 1, latent_dim, seed).to(device),
                  torch.zeros(1, dtype=torch.int64, device=device) if num_classes else None)
        probe = to_uint8(probe) if probe.dim() == 4 else probe
        template = {k: v[:0] for k, v in (extract(probe) if extract else {"samples": probe.float()}).items()}
    return gather_ordered(keys, outputs, device, template)


def rank_pieces(info: DatasetInfo, end: int, rank: int, world_size: int) -> list[tuple[int, Piece]]:
    """(first dataset index, piece) for this rank's contiguous share of indices [0, end)."""
    low, high = rank * end // world_size, (rank + 1) * end // world_size
    pieces, begin = [], 0
    for shard, count in enumerate(info.shard_counts):
        start, stop = max(low, begin), min(high, begin + count)
        if start < stop:
            pieces.append((start, Piece(shard, start - begin, stop - begin)))
        begin += count
    return pieces


def _selected_batches(info: DatasetInfo, selection: Selection, batch: int, rank: int, world_size: int):
    """(dataset indices, uint8 samples, labels) of this rank's selected samples, a batch at a time."""
    indices, samples, labels = [], [], []
    for first, piece in rank_pieces(info, selection.end, rank, world_size):
        offset = first - piece.start
        select = None if selection.mask is None else (lambda i, o=offset: bool(selection.mask[i + o]))
        offsets = info.offsets[piece.shard] if info.offsets else None
        records = read_retrying(info.urls[piece.shard], piece, offsets, info.shape, info.dtype, info.num_classes,
                                Counter(), select, layout=info.layout(piece.shard))
        for index, record in enumerate(records, start=first):
            if record is None or isinstance(record, Exception):  # not selected, or a bad sample (skipped)
                continue
            indices.append(index)
            samples.append(record[0])
            labels.append(record[1])
            if len(indices) == batch:
                yield indices, np.stack(samples), labels
                indices, samples, labels = [], [], []
    if indices:
        yield indices, np.stack(samples), labels


@torch.no_grad()
def real(info: DatasetInfo, selection: Selection, batch: int, rank: int, world_size: int, device,
         extract: Extract | None, progress: ProgressFactory | None = None) -> dict[str, torch.Tensor]:
    """Features of the selected real samples on rank 0 (the uint8 samples if `extract` is None),
    with their labels and dataset indices; {} on the other ranks. `progress(total, unit)`
    counts this rank's samples (the total is an upper bound: bad samples are skipped)."""
    rows, failure = Rows(_num_selected(info, selection, rank, world_size)), ""
    try:
        with (progress or _quiet)(rows.expected, "samples") as shown:
            for indices, samples, labels in _selected_batches(info, selection, batch, rank, world_size):
                images = torch.from_numpy(samples).to(device)
                out = extract(images) if extract else {"samples": images}
                index = torch.tensor(indices, dtype=torch.int64)
                rows.add({**{k: v.cpu() for k, v in out.items()},  # device memory holds one batch
                          "labels": torch.tensor(labels, dtype=torch.int64), "index": index, "key": index})
                shown.advance(len(indices))
    except ReadFailure as err:  # retried already; the other ranks must not wait in the gather
        failure = str(err)
    _stop_together(failure, device)
    keys, outputs = rows.outputs()
    return gather_ordered(keys, outputs, device, template=_template(info, extract, device))


def _quiet(total: int | None, unit: str):
    return task_progress("", total, unit, enabled=False)


def _num_selected(info: DatasetInfo, selection: Selection, rank: int, world_size: int) -> int:
    """This rank's selected samples (an upper bound: bad ones are skipped when read)."""
    ranges = [(first, first + piece.size) for first, piece in rank_pieces(info, selection.end, rank, world_size)]
    if selection.mask is None:
        return sum(high - low for low, high in ranges)
    return int(sum(selection.mask[low:high].sum() for low, high in ranges))


def _stop_together(failure: str, device) -> None:
    """Every rank: raise the same UserError when any rank could not read its share."""
    import torch.distributed as dist

    reasons = [failure]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        flag = torch.tensor([float(bool(failure))], device=device)
        dist.all_reduce(flag)
        if flag.item():
            reasons = [None] * dist.get_world_size()
            dist.all_gather_object(reasons, failure)
    failed = next((r for r in reasons if r), "")
    if failed:
        raise UserError(f"evaluation: cannot read the real samples: {failed}; check the shards "
                        "(gan-dist prepare --verify DIR) and the storage")


def _template(info: DatasetInfo, extract: Extract | None, device) -> dict[str, torch.Tensor]:
    """An empty output with the right widths, for a rank that holds no sample."""
    probe = torch.zeros((1, *info.shape), dtype=torch.uint8, device=device)
    out = {k: v[:0].cpu() for k, v in (extract(probe) if extract else {"samples": probe}).items()}
    out["labels"] = out["index"] = torch.zeros(0, dtype=torch.int64)
    return out


def gather_ordered(keys: list[torch.Tensor], outputs: list[dict[str, torch.Tensor]], device,
                   template: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Every rank's rows on rank 0, sorted by key ({} elsewhere); the same rows and order for
    any number of ranks. Tensors travel through `device` (NCCL gathers CUDA tensors) and come
    back on the CPU."""
    import torch.distributed as dist

    if not outputs and template is None:
        raise ValueError("a rank with nothing to gather needs a template")
    local = {name: torch.cat([o[name].cpu() for o in outputs]) if outputs else template[name].cpu()
             for name in (outputs[0] if outputs else template)}
    local_keys = torch.cat([k.cpu() for k in keys]) if keys else torch.zeros(0, dtype=torch.int64)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        order = local_keys.argsort()
        return {name: value[order] for name, value in local.items()}
    rank, world = dist.get_rank(), dist.get_world_size()
    counts = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
    dist.all_gather(counts, torch.tensor([len(local_keys)], device=device))
    counts = [int(c.item()) for c in counts]

    def gathered(tensor: torch.Tensor) -> torch.Tensor | None:
        """Rank 0 receives GATHER_ROWS rows per rank at a time, straight to the CPU: its device
        holds world_size x GATHER_ROWS rows, never the whole reference."""
        pieces: list[list[torch.Tensor]] = [[] for _ in counts]
        for first in range(0, max(counts), GATHER_ROWS):
            chunk = torch.zeros((GATHER_ROWS, *tensor.shape[1:]), dtype=tensor.dtype, device=device)
            mine = tensor[first:first + GATHER_ROWS]
            chunk[:len(mine)] = mine.to(device)
            parts = [torch.empty_like(chunk) for _ in counts] if rank == 0 else None
            dist.gather(chunk, parts, dst=0)
            for r, part in enumerate(parts or []):
                pieces[r].append(part[:max(0, min(GATHER_ROWS, counts[r] - first))].cpu())
        if rank != 0:
            return None
        return torch.cat([torch.cat(p) for p in pieces if p]) if any(pieces) else tensor[:0].cpu()

    all_keys = gathered(local_keys)
    values = {name: gathered(value) for name, value in local.items()}
    if rank != 0:
        return {}
    order = all_keys.argsort()
    return {name: value[order] for name, value in values.items()}
