"""Samples and their features, split over the processes by GLOBAL rank and gathered in order.

Generated samples come in chunks whose latents depend only on (seed, chunk index), and
chunk c goes to rank c mod world_size; real samples are read shard by shard, shard s by rank
s mod world_size. Each rank extracts features for its share; one all-gather and a sort by
sample index then give every rank the same features in the same order, so the numbers do
not depend on the number of processes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from gan_dist.data.stream import DatasetInfo, _Bad, _read_shard
from gan_dist.visual import to_uint8

Extract = Callable[[torch.Tensor], dict[str, torch.Tensor]]


def dataset_key(info: DatasetInfo) -> str:
    """Names a dataset's content for caches: its shard list and per-shard counts (index.json)."""
    text = json.dumps({"urls": [Path(u).name for u in info.urls], "counts": info.shard_counts,
                       "shape": list(info.shape), "classes": info.classes})
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def chunk_latents(chunk: int, size: int, latent_dim: int, seed: int) -> torch.Tensor:
    return torch.randn(size, latent_dim, generator=torch.Generator().manual_seed(seed * 1_000_003 + chunk))


@torch.no_grad()
def generated(G, latent_dim: int, num_classes: int, num: int, batch: int, seed: int, rank: int, world_size: int,
              device, extract: Extract | None) -> dict[str, torch.Tensor]:
    """Features of `num` samples of G (the raw samples if `extract` is None), on every rank.

    Images are quantised to uint8 first, as stored data is; 2-D points are passed as they are."""
    keys, outputs = [], []
    for chunk in range(rank, -(-num // batch), world_size):
        first = chunk * batch
        size = min(batch, num - first)
        z = chunk_latents(chunk, size, latent_dim, seed).to(device)
        labels = (torch.arange(first, first + size, device=device) % num_classes) if num_classes else None
        samples = G(z, labels)
        if samples.dim() == 4:
            samples = to_uint8(samples)
        outputs.append(extract(samples) if extract else {"samples": samples.float()})
        keys.append(torch.arange(first, first + size, device=device))
    template = None
    if not outputs:  # more ranks than chunks: this one only learns the output widths
        probe = G(chunk_latents(0, 1, latent_dim, seed).to(device),
                  torch.zeros(1, dtype=torch.int64, device=device) if num_classes else None)
        probe = to_uint8(probe) if probe.dim() == 4 else probe
        template = {k: v[:0] for k, v in (extract(probe) if extract else {"samples": probe.float()}).items()}
    return gather_ordered(keys, outputs, device, template)


def real_records(info: DatasetInfo, rank: int, world_size: int) -> Iterator[tuple[int, np.ndarray, int]]:
    """(order key, sample, label) of this rank's shards; keys sort as the dataset's order."""
    for shard, url in enumerate(info.urls):
        if shard % world_size != rank:
            continue
        for position, record in enumerate(_read_shard(url, info.shape, info.dtype, info.num_classes)):
            if not isinstance(record, _Bad):
                yield shard << 32 | position, record[0], record[1]


@torch.no_grad()
def real(info: DatasetInfo, keep: Callable[[int], bool], batch: int, rank: int, world_size: int, device,
         extract: Extract | None) -> dict[str, torch.Tensor]:
    """Features of the dataset's samples whose index (in dataset order) passes `keep`."""
    records = list(real_records(info, rank, world_size))
    # Global indices need every rank's counts: exchange them, then number in dataset order.
    order_keys = torch.tensor([r[0] for r in records], dtype=torch.int64, device=device)
    everything = gather_ordered([order_keys], [{"k": order_keys}], device)["k"]
    index_of = {int(k): i for i, k in enumerate(everything.tolist())}
    mine = [(index_of[k], sample, label) for k, sample, label in records if keep(index_of[k])]
    keys, outputs = [], []
    for start in range(0, len(mine), batch):
        part = mine[start:start + batch]
        samples = torch.from_numpy(np.stack([p[1] for p in part])).to(device)
        out = extract(samples) if extract else {"samples": samples.float()}
        out["labels"] = torch.tensor([p[2] for p in part], device=device)
        outputs.append(out)
        keys.append(torch.tensor([p[0] for p in part], dtype=torch.int64, device=device))
    return gather_ordered(keys, outputs, device, template=_template(info, extract, device))


def _template(info: DatasetInfo, extract: Extract | None, device) -> dict[str, torch.Tensor]:
    """An empty output with the right widths, for a rank that holds no sample."""
    probe = torch.zeros((1, *info.shape), dtype=torch.uint8, device=device)
    out = {k: v[:0] for k, v in (extract(probe) if extract else {"samples": probe.float()}).items()}
    out["labels"] = torch.zeros(0, dtype=torch.int64, device=device)
    return out


def gather_ordered(keys: list[torch.Tensor], outputs: list[dict[str, torch.Tensor]], device,
                   template: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Concatenate every rank's rows and sort them by key: the same result on every rank."""
    import torch.distributed as dist

    if not outputs and template is None:
        raise ValueError("a rank with nothing to gather needs a template")
    local = {name: torch.cat([o[name] for o in outputs]) if outputs else template[name]
             for name in (outputs[0] if outputs else template)}
    local_keys = torch.cat(keys) if keys else torch.zeros(0, dtype=torch.int64, device=device)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        order = local_keys.argsort()
        return {name: value[order] for name, value in local.items()}
    counts = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, torch.tensor([len(local_keys)], device=device))
    most = int(max(c.item() for c in counts))

    def gathered(tensor: torch.Tensor) -> torch.Tensor:
        padded = torch.zeros((most, *tensor.shape[1:]), dtype=tensor.dtype, device=device)
        padded[:len(tensor)] = tensor
        parts = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(parts, padded.contiguous())
        return torch.cat([p[:int(c.item())] for p, c in zip(parts, counts, strict=True)])

    all_keys = gathered(local_keys)
    order = all_keys.argsort()
    return {name: gathered(value)[order] for name, value in local.items()}
