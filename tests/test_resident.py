"""Resident mode (the dataset in one array, batches gathered by index) and exact stream
positions in every layout: per sample, chunked, fewer shards than slots, resident."""

import itertools
import json

import numpy as np
import pytest
import torch
from conftest import tiny_args
from shards import keys_in

from gan_dist.data.index import DatasetInfo
from gan_dist.data.prepare import write_shards
from gan_dist.data.resident import AUTO_MAX_BYTES, choose
from gan_dist.data.sources import digits
from gan_dist.data.stream import make_loader, open_dataset
from gan_dist.errors import UserError

GIB = 2**30


def _batches(info, batch, rank=0, world_size=1, count=40, **options):
    return list(itertools.islice(iter(make_loader(info, batch, 0, rank, options.pop("num_workers", 0), 64,
                                                  world_size=world_size, resident="host", **options)), count))


def test_the_order_depends_on_the_global_batch_only(digits_dir):
    """Rank r's batch k is the r-th part of global batch k: 2 ranks x 16 read what 1 x 32 reads,
    with any worker count, and every epoch (a seeded permutation) holds each sample once."""
    info = open_dataset(str(digits_dir))
    one = _batches(info, 32, count=120)  # 3,840 samples: two epochs of 1,797 and a part
    two = [_batches(info, 16, rank, 2, count=120, num_workers=workers) for rank, workers in ((0, 2), (1, 0))]
    for k in range(120):
        assert one[k].keys.tolist() == two[0][k].keys.tolist() + two[1][k].keys.tolist(), k
        assert torch.equal(one[k].samples, torch.cat([two[0][k].samples, two[1][k].samples]))
    stream = np.concatenate([b.keys for b in one])
    count = info.count
    for epoch in (0, 1):
        assert sorted(stream[epoch * count:(epoch + 1) * count].tolist()) == list(range(count))
    assert stream[:count].tolist() != stream[count:2 * count].tolist()
    assert [(b.epoch, b.position) for b in one[55:57]] == [(0, 56 * 32), (1, 57 * 32 - count)]
    other_seed = list(itertools.islice(iter(make_loader(info, 32, 1, 0, 0, 64, resident="host")), 1))
    assert other_seed[0].keys.tolist() != one[0].keys.tolist()
    on_device = _batches(info, 32, count=3, device=torch.device("cpu"))
    assert all(torch.equal(a.samples, b.samples) for a, b in zip(on_device, one))


def _with_bad_samples(clean, out, shard: int, bad_rows: list[int]):
    """A copy of `clean` (per-sample shards) whose shard `shard` has `bad_rows` corrupt, all else kept."""
    import shutil
    import tarfile

    from shards import rewrite_shard

    shutil.copytree(clean, out)
    entries = {}
    with tarfile.open(out / f"shard-{shard:06d}.tar") as tar:
        for member in tar:
            key, _, field = member.name.partition(".")
            entries.setdefault(key, {"__key__": key})[field] = tar.extractfile(member).read()
    samples = list(entries.values())
    for row in bad_rows:
        samples[row]["npy"] = b"\x93NUMPY garbage"
    rewrite_shard(out, shard, samples)
    return open_dataset(str(out))


def test_bad_samples_keep_their_place_and_are_counted_where_the_order_reaches_them(tmp_path):
    """Each bad sample is counted once per epoch, in the batch (and on the rank) whose part of
    the order holds it, and the next good row takes its place; the order is the one a clean
    copy gives, so ranks whose reads met different bad samples still agree on every position."""
    clean = write_shards(digits(), tmp_path / "clean", chunk=1)
    info = _with_bad_samples(clean, tmp_path / "bad", 3, [1, 2])
    bad_keys = set(keys_in(info.urls[3])[1:3])
    ranks = [_batches(info, 50, rank, 2, count=80) for rank in (0, 1)]  # 8,000 samples: 4.45 epochs
    hits = [b.bad_count for r in ranks for b in r]
    epochs = 8000 / info.count
    assert 2 * int(epochs) <= sum(hits) <= 2 * int(epochs) + 2 and max(hits) <= 2
    assert len([h for h in hits if h]) >= 4, "the count is spread over the batches that reach them"
    assert all(b.bad_messages for r in ranks for b in r if b.bad_count)
    assert "shard-000003.tar key" in next(b for b in ranks[0] + ranks[1] if b.bad_count).bad_messages[0]
    keys = {int(k) for r in ranks for b in r for k in b.keys}
    assert not keys & bad_keys and len(keys) == info.count - 2 and all(len(b.keys) == 50 for r in ranks for b in r)
    reference = [_batches(open_dataset(str(clean)), 50, rank, 2, count=80) for rank in (0, 1)]
    for got, want in zip(ranks[0] + ranks[1], reference[0] + reference[1], strict=True):
        assert (got.epoch, got.position) == (want.epoch, want.position)
        same = np.isin(want.keys, list(bad_keys), invert=True)
        assert got.keys[same].tolist() == want.keys[same].tolist() and got.bad_count == (~same).sum()
    assert ranks[0][0].read_bytes == ranks[1][0].read_bytes > 0 and ranks[0][1].read_bytes == 0
    stop = 30  # a resume mid-epoch counts what follows, not the epoch's bad samples again
    start = {"workers": {0: (ranks[0][stop].epoch, ranks[0][stop].position, [])}}
    resumed = _batches(info, 50, 0, 2, count=80 - stop - 1, start=start)
    assert [b.bad_count for b in resumed] == [b.bad_count for b in ranks[0][stop + 1:]]


def test_a_shard_that_cannot_be_loaded_ends_the_stream_by_name(digits_dir):
    info = open_dataset(str(digits_dir))
    info.urls[2] = f"pipe:exit 1; cat {info.urls[2]}"
    batch = _batches(info, 16, max_shard_retries=2, retry_backoff_s=0)[0]
    assert batch.samples is None and "shard-000002.tar" in batch.fatal and "3 times" in batch.fatal
    assert batch.shard_failures == 3 and batch.shard_retries == 2


def _info(count: int, shape=(3, 64, 64), counts=True) -> DatasetInfo:
    return DatasetInfo(["x.tar"], shape, "uint8", count, shard_counts=[count] if counts else None)


def test_auto_holds_what_fits_and_streams_the_rest():
    ffhq64, imagenet64 = _info(70_000), _info(1_281_167)
    assert choose(ffhq64, "auto", 8, 128 * GIB)[0] == "host"  # 0.8 GiB x 8 GPUs of a node
    mode, why = choose(imagenet64, "auto", 1, 1024 * GIB)
    assert mode == "off" and "above the 4 GiB" in why and imagenet64.count * 12288 > AUTO_MAX_BYTES
    mode, why = choose(ffhq64, "auto", 8, 16 * GIB)
    assert mode == "off" and "8 copies" in why
    assert choose(_info(70_000, counts=False), "auto", 1, 128 * GIB)[0] == "off"
    assert choose(imagenet64, "host", 1, 1)[0] == "host" and choose(ffhq64, "off", 1, 128 * GIB)[0] == "off"
    with pytest.raises(UserError, match="data.resident=device needs the dataset's index.json"):
        choose(_info(10, counts=False), "device", 1, 128 * GIB)


def test_auto_keeps_a_resumed_checkpoint_s_mode_while_it_fits():
    from gan_dist.data.stream import STREAM_FORMAT

    ffhq64 = _info(70_000)
    mode, why = choose(ffhq64, "auto", 8, 128 * GIB, previous=STREAM_FORMAT)
    assert mode == "off" and "as the checkpoint was" in why
    assert choose(ffhq64, "auto", 8, 128 * GIB, previous="resident")[0] == "host"
    assert choose(ffhq64, "auto", 8, 16 * GIB, previous="resident")[0] == "off"  # no longer fits
    assert choose(ffhq64, "auto", 8, 128 * GIB, previous="stream/1")[0] == "host"  # a layout change anyway
    assert choose(ffhq64, "host", 8, 128 * GIB, previous=STREAM_FORMAT)[0] == "host"


LAYOUTS = {  # (prepare options, workers, world size, resident)
    "per sample": ({"shard_size": 256, "chunk": 1}, 2, 2, "off"),
    "chunked": ({"shard_size": 256, "chunk": 50}, 2, 2, "off"),
    "fewer shards than slots": ({"shard_size": 600, "chunk": 50}, 4, 2, "off"),
    "resident": ({"shard_size": 256, "chunk": 50}, 0, 2, "host"),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_a_stream_resumed_from_a_batch_position_continues_exactly(tmp_path, layout):
    """Stop after batch 17 of 24-sample batches (inside a chunk of 50), resume from the
    positions the batches reported, as a checkpoint records them: the same batches follow."""
    prepare, workers, world_size, resident = LAYOUTS[layout]
    info = open_dataset(str(write_shards(digits(), tmp_path / "d", **prepare)))

    def loader(start=None):
        return iter(make_loader(info, 24, 0, 1, workers, 64, world_size=world_size, start=start, resident=resident))

    uninterrupted = list(itertools.islice(loader(), 60))
    stop = 17
    positions = {b.worker: (b.epoch, b.position, list(b.failures)) for b in uninterrupted[:stop + 1]}
    assert any(position % 50 for _, position, _ in positions.values()), "the stop is not inside a chunk"
    start = {"rotation": (stop + 1) % max(1, workers), "workers": positions}
    resumed = list(itertools.islice(loader(start), 60 - stop - 1))
    # The digits are all good: a bad sample or a storage failure here is the reader's fault
    # (and would change the batches of one pass only), so it is named before the comparison.
    trouble = [(b.bad_count, b.bad_messages, b.shard_failures, b.fatal) for b in uninterrupted + resumed
               if b.bad_count or b.shard_failures or b.fatal]
    assert not trouble, trouble
    for want, got in zip(uninterrupted[stop + 1:], resumed, strict=True):
        assert got.keys.tolist() == want.keys.tolist() and torch.equal(got.samples, want.samples)
        assert (got.worker, got.epoch, got.position) == (want.worker, want.epoch, want.position)


def test_switching_between_streamed_and_resident_is_a_layout_change(train_main, tmp_path):
    digits_dir = write_shards(digits(), tmp_path / "own-digits", chunk=64)  # no other test's files
    assert train_main(*tiny_args(digits_dir, "train.max_steps=3", "data.resident=off"))[0] == 0
    code, out, err = train_main(*tiny_args(digits_dir, "train.max_steps=5"))  # auto: stays streamed
    assert code == 0, err
    assert "at step 3" in out
    state = json.loads((tmp_path / "runs" / "tiny" / "checkpoints" / "step_00000005" / "state.json").read_text())
    assert state["data_mode"] == "stream/2"  # auto chose streamed again (alone it would hold the digits)
    code, out, err = train_main(*tiny_args(digits_dir, "train.max_steps=10", "data.resident=host"))
    assert code == 0, err
    assert out.count("resumed with") == 1 and "start at the next epoch" in out
    assert "1 processes x resident on cpu" in out and "where the checkpoint had 1 processes x 0 workers (stream/2)" in out
    state = json.loads((tmp_path / "runs" / "tiny" / "checkpoints" / "step_00000010" / "state.json").read_text())
    assert state["data_mode"] == "resident" and state["num_workers"] == 0
    code, out, err = train_main(*tiny_args(digits_dir, "train.max_steps=15", "data.resident=auto",
                                           "data.num_workers=0"))
    assert code == 0, err
    # auto keeps the checkpoint's mode; resident data has no workers, so their count is no change
    assert "at step 10" in out and "resumed with" not in out


def test_an_empty_shard_is_no_lost_shard(tmp_path):
    from shards import rewrite_shard

    path = write_shards(digits(), tmp_path / "d", shard_size=256, chunk=1)
    rewrite_shard(path, 2, [])
    info = open_dataset(str(path))
    batch = _batches(info, 16, count=1, max_shard_retries=1, retry_backoff_s=0)[0]
    assert not batch.fatal and batch.shard_failures == 0 and info.shard_counts[2] == 0
