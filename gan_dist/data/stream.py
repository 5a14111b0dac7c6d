"""Shards -> batches: an endless, deterministic webdataset stream per process.

Every process draws shards with replacement (`ResampledShards`), so each rank has an
endless stream and all ranks take the same number of batches: DDP never waits on a rank
that ran out of data. Everything random is seeded from (train.seed, GLOBAL rank, worker);
webdataset's own shuffle would otherwise seed itself from the pid and the clock.
Batches stay uint8 here; the trainer normalises them on the device. The loader is never
passed through `accelerator.prepare`, which would split or broadcast it a second time.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from gan_dist.errors import UserError
from gan_dist.seeds import derive_seed


@dataclass
class DatasetInfo:
    urls: list[str]
    shape: tuple[int, ...]
    dtype: str
    count: int = 0
    classes: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _decode(sample: dict) -> tuple[np.ndarray, int, str]:
    array = np.load(io.BytesIO(sample["npy"]), allow_pickle=False)
    label = int(sample["cls"]) if "cls" in sample else -1
    return array, label, sample["__key__"]


def _read_first_sample(url: str) -> np.ndarray:
    import webdataset as wds

    for sample in wds.DataPipeline(wds.SimpleShardList([url]), wds.tarfile_to_samples()):
        return _decode(sample)[0]
    raise UserError(f"shard {url} holds no samples; re-run gan-dist prepare")


def open_dataset(path: str) -> DatasetInfo:
    """A dataset directory (index.json) or a shard pattern, checked to exist and be non-empty."""
    import webdataset as wds

    if not path:
        raise UserError("no dataset path given; set data.path=DIR (a directory with index.json or a shard pattern)")
    local = Path(path)
    if local.is_dir():
        index_file = local / "index.json"
        if not index_file.is_file():
            raise UserError(f"data.path={path} has no index.json; prepare it with gan-dist prepare")
        index = json.loads(index_file.read_text())
        urls = [str(local / shard["name"]) for shard in index.get("shards", [])]
        if not urls or index.get("count", 0) == 0:
            raise UserError(f"data.path={path} lists no samples; re-run gan-dist prepare")
        _check_local(urls)
        return DatasetInfo(urls, tuple(index["shape"]), index["dtype"], index["count"], index["classes"])
    urls = wds.shardlists.expand_urls(path)
    _check_local(urls)
    first = _read_first_sample(urls[0])
    return DatasetInfo(urls, tuple(first.shape), str(first.dtype))


def _check_local(urls: list[str]) -> None:
    remote = ("pipe:", "http:", "https:", "gs:")
    missing = [u for u in urls if not u.startswith(remote) and not Path(u).is_file()]
    if missing:
        raise UserError(f"data.path: {len(missing)} of {len(urls)} shards are missing, "
                        f"e.g. {missing[0]}; check data.path or re-run gan-dist prepare")
    empty = [u for u in urls if not u.startswith(remote) and Path(u).stat().st_size == 0]
    if empty:
        raise UserError(f"data.path: shard {empty[0]} is empty; re-run gan-dist prepare")


class _WorkerSeed:
    """Seed for the current DataLoader worker, from (seed, global rank, worker, purpose)."""

    def __init__(self, seed: int, rank: int, purpose: int):
        self.seed, self.rank, self.purpose = seed, rank, purpose

    def __call__(self) -> int:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        return derive_seed(self.seed, self.rank, worker, self.purpose)


class _SeededShuffle:
    """webdataset's buffer shuffle, seeded inside each worker when iteration starts."""

    def __init__(self, bufsize: int, seed_fn: _WorkerSeed):
        self.bufsize, self.seed_fn = bufsize, seed_fn

    def __call__(self, src):
        import webdataset as wds

        if self.bufsize <= 1:
            return src
        return wds.shuffle(self.bufsize, initial=self.bufsize, seed=self.seed_fn())(src)


class _CachedShardSamples:
    """Decoded samples per shard URL; shards that fit in `max_bytes` are read from disk only once.

    The stream is the same with or without the cache (a cached shard replays its samples in
    file order), so the cache only saves the tar parsing and decoding of small datasets.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.cache: dict[str, list] = {}
        self.used_bytes = 0

    def __call__(self, shards):
        import webdataset as wds

        for shard in shards:
            url = shard["url"]
            if url in self.cache:
                yield from self.cache[url]
                continue
            samples = []
            for sample in wds.tarfile_samples(iter([shard])):
                decoded = _decode(sample)
                samples.append(decoded)
                yield decoded
            size = sum(s[0].nbytes + 64 for s in samples)
            if self.used_bytes + size <= self.max_bytes:
                self.cache[url] = samples
                self.used_bytes += size


def _collate(samples: list) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    arrays, labels, keys = zip(*samples)
    return torch.from_numpy(np.stack(arrays)), torch.tensor(labels, dtype=torch.int64), list(keys)


def _as_is(batch):
    # Batches are collated in the workers; the default would walk every key string again.
    return batch


def make_loader(info: DatasetInfo, batch_per_device: int, seed: int, rank: int,
                num_workers: int, shuffle_buffer: int, cache_mb: float = 0, pin_memory: bool = False):
    """An endless DataLoader of (samples, labels, keys) batches for this rank."""
    import webdataset as wds

    pipeline = wds.DataPipeline(
        wds.ResampledShards(info.urls, deterministic=True, seed=seed,
                            worker_seed=_WorkerSeed(seed, rank, purpose=0)),
        _CachedShardSamples(int(cache_mb * 2**20)),
        _SeededShuffle(shuffle_buffer, _WorkerSeed(seed, rank, purpose=1)),
        wds.batched(batch_per_device, collation_fn=_collate, partial=False),
    )
    generator = torch.Generator().manual_seed(derive_seed(seed, rank, 2))
    return torch.utils.data.DataLoader(
        pipeline, batch_size=None, collate_fn=_as_is, num_workers=num_workers, generator=generator,
        persistent_workers=num_workers > 0, pin_memory=pin_memory,
        prefetch_factor=4 if num_workers > 0 else None,
    )
