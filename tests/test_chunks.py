"""Chunked shards: written by prepare, read in sub-chunk pieces, mixed across chunks, bad as a whole."""

import json

import numpy as np
import pytest
from shards import keys_in, rewrite_shard

from gan_dist.data.plan import Piece, plan_epoch
from gan_dist.data.prepare import write_shards
from gan_dist.data.reader import Counter, read_piece
from gan_dist.data.samples import BadSample, encode_chunk
from gan_dist.data.sources import ArraySource, digits
from gan_dist.data.stream import make_loader, open_dataset
from gan_dist.errors import UserError


@pytest.fixture(scope="module")
def chunked(tmp_path_factory):
    """The digits in shards of 256 and chunks of 100 (100, 100, 56 per shard), and per sample."""
    out = tmp_path_factory.mktemp("chunked")
    return (write_shards(digits(), out / "chunked", shard_size=256, chunk=100),
            write_shards(digits(), out / "per-sample", shard_size=256, chunk=1))


def _keys(loader):
    return [int(k) for b in loader for k in b.keys]


def test_prepare_writes_chunks_with_one_offset_per_chunk(chunked):
    index = json.loads((chunked[0] / "index.json").read_text())
    assert index["format"] == "gan_dist.shards/4" and index["chunk_size"] == 100
    assert [len(s["offsets"]) for s in index["shards"]][:7] == [4] * 7  # 3 chunks and the end
    assert json.loads((chunked[1] / "index.json").read_text())["chunk_size"] == 1
    # The same samples in the same order, whatever the layout.
    info, per_sample = open_dataset(str(chunked[0])), open_dataset(str(chunked[1]))
    assert [keys_in(u) for u in info.urls] == [keys_in(u) for u in per_sample.urls]


@pytest.mark.parametrize("num_slots", [3, 7, 16])
def test_pieces_that_start_and_end_inside_chunks_read_their_samples_once(chunked, num_slots):
    info = open_dataset(str(chunked[0]))
    shard_keys = [keys_in(u) for u in info.urls]
    counter, read = Counter(), []
    for pieces in plan_epoch(info.shard_counts, 0, 0, num_slots):
        for piece in pieces:
            keys = [int(k) for block in read_piece(info.urls[piece.shard], piece, info.offsets[piece.shard],
                                                   info.shape, info.dtype, 0, counter,
                                                   layout=info.layout(piece.shard)) for k in block.keys]
            assert keys == shard_keys[piece.shard][piece.start:piece.stop]
            read += keys
    assert sorted(read) == list(range(info.count))
    dataset_bytes = sum(o[-1] for o in info.offsets)
    chunk_bytes = max(o[1] - o[0] for o in info.offsets)
    # A cut inside a chunk reads that chunk twice (once per side): at most one chunk per slot.
    assert dataset_bytes <= counter.bytes <= dataset_bytes + num_slots * chunk_bytes


def test_the_worker_shuffle_mixes_8_chunks_and_other_batches_every_epoch(tmp_path):
    """Chunks of 16, the smallest buffer: every batch of 16 still draws on about 8 chunks, and
    the batches of one epoch are not the batches of the next."""
    data = write_shards(digits(), tmp_path / "c16", shard_size=256, chunk=16)
    info = open_dataset(str(data))
    chunk_of = {k: (s, i // 16) for s, url in enumerate(info.urls) for i, k in enumerate(keys_in(url))}
    epochs = [[b.keys.tolist() for b in make_loader(info, 16, 0, 0, 0, shuffle_buffer=2, num_epochs=e).loader
               if len(b.keys) and b.epoch == e - 1] for e in (1, 2)]
    chunks_per_batch = [len({chunk_of[k] for k in batch}) for batch in epochs[0][8:-8]]
    assert np.mean(chunks_per_batch) >= 6 and min(chunks_per_batch) >= 3
    unshuffled = [b.keys.tolist() for b in make_loader(info, 16, 0, 0, 0, shuffle_buffer=1, num_epochs=1)]
    assert np.mean([len({chunk_of[k] for k in batch}) for batch in unshuffled]) <= 2  # the control
    pairs = [{frozenset((a, b)) for batch in epoch for a in batch for b in batch if a < b} for epoch in epochs]
    assert len(pairs[0] & pairs[1]) < 0.25 * len(pairs[0])


def _chunk_entry(keys, labels, shape=(1, 8, 8)):
    samples = np.zeros((len(keys), *shape), dtype=np.uint8)
    return encode_chunk(f"{keys[0]:08d}", samples, np.array(labels), np.array(keys))


def test_a_corrupt_chunk_counts_all_its_samples_as_bad(tmp_path):
    data = write_shards(digits(), tmp_path / "bad", shard_size=256, chunk=100)
    broken = _chunk_entry(list(range(5000, 5100)), [1] * 100)
    broken["samples.npy"] = broken["samples.npy"][:200]  # cut off: does not parse
    rewrite_shard(data, 2, [_chunk_entry(list(range(4000, 4100)), [3] * 100), broken,
                            _chunk_entry(list(range(6000, 6056)), [12] + [2] * 55)], rows=[100, 100, 56])
    info = open_dataset(str(data))
    batches = list(make_loader(info, 16, 0, 0, 0, 64, num_epochs=1, conditional=True))
    assert sum(b.bad_count for b in batches) == 101  # the whole cut-off chunk, and one label out of range
    messages = [m for b in batches for m in b.bad_messages]
    assert any("shard-000002.tar chunk 00005000: corrupt chunk" in m for m in messages)
    assert any("label 12 outside the dataset's 10 classes" in m for m in messages)
    keys = _keys(batches)
    assert not set(range(5000, 5100)) & set(keys) and 6000 not in keys and len(keys) == len(set(keys))
    piece = Piece(2, 150, 160)  # inside the cut-off chunk: its share of it counts
    record = next(read_piece(info.urls[2], piece, info.offsets[2], info.shape, info.dtype, 10, Counter(),
                             layout=info.layout(2)))
    assert isinstance(record, BadSample) and record.count == 10


def test_an_index_from_before_chunks_is_still_read(chunked, tmp_path):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(chunked[1], old)
    index = json.loads((old / "index.json").read_text())
    index["format"] = "gan_dist.shards/3"
    del index["chunk_size"]
    (old / "index.json").write_text(json.dumps(index))
    info = open_dataset(str(old))
    assert info.chunk_size == 1
    assert sorted(_keys(make_loader(info, 1, 0, 0, 0, 64, num_epochs=1))) == list(range(info.count))


def test_chunk_options_are_checked(tmp_path):
    images = np.zeros((4, 3, 8, 8), dtype=np.uint8)
    source = ArraySource(images, np.zeros(4, int), [], "zeros")
    with pytest.raises(UserError, match="--chunk 8 applies to --format npy"):
        write_shards(source, tmp_path / "p", fmt="png", chunk=8)
    with pytest.raises(UserError, match="--chunk must be >= 0"):
        write_shards(source, tmp_path / "n", chunk=-1)
    assert json.loads((write_shards(source, tmp_path / "auto") / "index.json").read_text())["chunk_size"] == 1024
    rgb64 = ArraySource(np.zeros((4, 3, 64, 64), np.uint8), np.zeros(4, int), [], "zeros")
    assert json.loads((write_shards(rgb64, tmp_path / "a64") / "index.json").read_text())["chunk_size"] == 128


def test_the_read_factor_of_a_stream_that_cannot_seek_counts_whole_chunks():
    from gan_dist.data.plan import read_multiplication

    # One shard of 10 chunks of 100 samples, 1,000 bytes each, on 3 slots: the pieces [0, 333),
    # [333, 666), [666, 1000) read from the shard's start to the end of the chunk holding their
    # last sample (4, 7 and 10 chunks) and need 4 chunks each.
    offsets = [[1000 * i for i in range(11)]]
    assert read_multiplication(1, [1000], offsets, 3, seekable=False, chunk_size=100) == pytest.approx(21 / 12)
    assert read_multiplication(1, [1000], offsets, 3, seekable=True, chunk_size=100) == 1.0


def test_a_shard_pattern_over_chunked_shards_knows_its_chunk_size(chunked):
    pattern = open_dataset(str(chunked[0] / "shard-{000000..000007}.tar"))
    assert pattern.chunk_size == 100 and pattern.shard_counts is None
    assert open_dataset(str(chunked[1] / "shard-{000000..000007}.tar")).chunk_size == 1
    import itertools

    keys = _keys(itertools.islice(iter(make_loader(pattern, 16, 0, 0, 0, 1000)), 1797 // 16))
    assert len(set(keys)) == len(keys) == 1792 and set(keys) <= {k for u in pattern.urls for k in keys_in(u)}


@pytest.mark.parametrize("value", [0, None, "abc", 2.5])
def test_an_index_with_a_chunk_size_that_is_no_count_is_refused_by_name(chunked, tmp_path, value):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(chunked[0], broken)
    index = json.loads((broken / "index.json").read_text())
    index["chunk_size"] = value
    (broken / "index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match="gives chunk_size .* re-run gan-dist prepare"):
        open_dataset(str(broken))


def test_a_corrupt_chunk_read_resident_counts_once_and_repeats_no_sample_much(tmp_path):
    """Resident: the cut-off chunk's 100 places in the epoch go to random good rows, not to
    100 copies of one neighbour; each bad sample is counted once in the epoch."""
    from collections import Counter as Tally

    data = write_shards(digits(), tmp_path / "bad", shard_size=256, chunk=100)
    broken = _chunk_entry(list(range(5000, 5100)), [1] * 100)
    broken["samples.npy"] = broken["samples.npy"][:200]
    rewrite_shard(data, 2, [_chunk_entry(list(range(4000, 4100)), [3] * 100), broken,
                            _chunk_entry(list(range(6000, 6056)), [2] * 56)], rows=[100, 100, 56])
    info = open_dataset(str(data))
    batches = list(make_loader(info, 1, 0, 0, 0, 64, num_epochs=1, conditional=True, resident="host"))
    assert len(batches) == info.count and sum(b.bad_count for b in batches) == 100
    assert any("shard-000002.tar chunk 00005000: corrupt chunk" in m for b in batches for m in b.bad_messages)
    repeats = Tally(_keys(batches))
    assert not set(range(5000, 5100)) & set(repeats) and len(repeats) == info.count - 100
    assert max(repeats.values()) <= 4
