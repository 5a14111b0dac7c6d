"""Real layouts at real scale: class-sorted folders, many readers, few shards, re-prepared data.

The cluster is simulated in-process: the planner is a pure function of (counts, seed, epoch,
slots), so 32 ranks x 4 workers over 1,000 shards is planned here as each worker would plan it.
"""

import json

import numpy as np
import pytest
from PIL import Image
from scipy.stats import chisquare
from shards import keys_in

from gan_dist.cli import main as cli_main
from gan_dist.data.index import class_skew
from gan_dist.data.plan import plan_epoch
from gan_dist.data.sources import digits
from gan_dist.data.stream import make_loader, open_dataset


@pytest.fixture(scope="module")
def sorted_folder(tmp_path_factory):
    """The 1,797 digits as PNG files in one folder per class, as users keep their images."""
    root = tmp_path_factory.mktemp("folder") / "digits"
    source = digits()
    for i, (image, label) in enumerate(zip(source.samples, source.labels)):
        folder = root / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image[0]).save(folder / f"{i:05d}.png")
    return root


def _prepare(folder, out, *flags) -> dict:
    assert cli_main(["prepare", "imagefolder", str(folder), "--out", str(out), "--channels", "1", *flags]) == 0
    return json.loads((out / "index.json").read_text())


def _worst_shard_p(index) -> float:
    totals = np.sum([s["class_counts"] for s in index["shards"]], axis=0)
    shares = totals / totals.sum()
    return min(chisquare(s["class_counts"], shares * s["count"]).pvalue for s in index["shards"])


def test_a_class_sorted_folder_is_written_shuffled(sorted_folder, tmp_path):
    shuffled = _prepare(sorted_folder, tmp_path / "shuffled", "--workers", "3")
    assert shuffled["order"] == "shuffled" and shuffled["seed"] == 0 and len(shuffled["shards"]) == 8
    assert _worst_shard_p(shuffled) > 0.001
    source = _prepare(sorted_folder, tmp_path / "source", "--order", "source")
    assert _worst_shard_p(source) < 1e-20  # the control: the old order fails the same test
    again = _prepare(sorted_folder, tmp_path / "one-worker", "--workers", "1")
    assert [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in shuffled["shards"]]
    # Every batch of both ranks mixes the classes (batch 64, default shuffle buffer).
    info = open_dataset(str(tmp_path / "shuffled"))
    for rank in (0, 1):
        loader = iter(make_loader(info, 64, 0, rank, 0, 1000, world_size=2, conditional=True))
        for _ in range(20):
            assert len(set(next(loader).labels.tolist())) >= 8
    assert class_skew(info) == ""
    assert "re-prepare it with gan-dist prepare" in class_skew(open_dataset(str(tmp_path / "source")))


def test_limit_takes_a_seeded_random_subset(sorted_folder, tmp_path):
    index = _prepare(sorted_folder, tmp_path / "limited", "--limit", "200", "--seed", "5")
    totals = np.sum([s["class_counts"] for s in index["shards"]], axis=0)
    assert index["count"] == 200 and index["limit"] == 200 and (totals > 5).all()  # every class, not the first
    first = _prepare(sorted_folder, tmp_path / "first", "--limit", "200", "--order", "source")
    assert np.count_nonzero(np.sum([s["class_counts"] for s in first["shards"]], axis=0)) <= 2


def test_an_old_class_sorted_dataset_is_warned_about(sorted_folder, tmp_path):
    """An index from before /3 (no order, counts or offsets) is read, and its skew found."""
    _prepare(sorted_folder, tmp_path / "old", "--order", "source", "--shard-size", "1000", "--chunk", "1")
    index = json.loads((tmp_path / "old" / "index.json").read_text())
    for key in ("order", "seed", "limit"):
        del index[key]
    for shard in index["shards"]:
        del shard["offsets"], shard["class_counts"]
    (tmp_path / "old" / "index.json").write_text(json.dumps(index))
    info = open_dataset(str(tmp_path / "old"))
    assert info.offsets is None and "quarters of the first shard" in class_skew(info)
    keys = [int(k) for b in make_loader(info, 1, 0, 1, 0, 1, world_size=3, num_epochs=1).loader for k in b.keys]
    assert keys == [k for p in plan_epoch(info.shard_counts, 0, 0, 3)[1] for k in keys_in(info.urls[p.shard])[p.start:p.stop]]


@pytest.mark.parametrize("counts, num_slots", [
    (np.random.default_rng(0).integers(900, 1100, size=1000).tolist(), 32 * 4),  # 1M images, 32 GPUs
    ([10_000, 10_000, 7_001], 128),  # 3 shards on 128 slots
    ([5] * 4 + [0] + [3], 8),  # tiny and empty shards
])
def test_an_epoch_plan_reads_each_sample_once_with_equal_slots(counts, num_slots):
    for epoch in (0, 1):
        plan = plan_epoch(counts, 0, epoch, num_slots)
        samples = [(p.shard, i) for pieces in plan for p in pieces for i in range(p.start, p.stop)]
        assert len(samples) == len(set(samples)) == sum(counts)
        sizes = [sum(p.size for p in pieces) for pieces in plan]
        assert max(sizes) - min(sizes) <= 1 and min(sizes) > 0  # within one sample: one batch at most
        # A slot reads a few contiguous runs: at most its share of shards plus two partial ones.
        assert max(len(pieces) for pieces in plan) <= sum(counts) / num_slots / min(c for c in counts if c) + 2
    assert plan_epoch(counts, 0, 0, num_slots) != plan_epoch(counts, 0, 1, num_slots)


def test_a_re_prepared_dataset_gets_new_cache_keys(sorted_folder, tmp_path):
    from gan_dist.eval.collect import dataset_key, reference_selection

    _prepare(sorted_folder, tmp_path / "a")
    _prepare(sorted_folder, tmp_path / "b", "--seed", "1")
    a, b = open_dataset(str(tmp_path / "a")), open_dataset(str(tmp_path / "b"))
    assert a.identity()["sha256"] != b.identity()["sha256"]
    first_100 = reference_selection(a, 100, 0)
    assert first_100.end == 100 and first_100.mask is None  # shuffled at prepare: read only the first 100
    assert dataset_key(a, first_100) != dataset_key(b, reference_selection(b, 100, 0))
    assert dataset_key(a, first_100) != dataset_key(a, reference_selection(a, 0, 0))


def test_more_reader_slots_than_samples_is_refused_by_name(tmp_path):
    from gan_dist.data.prepare import write_shards
    from gan_dist.errors import UserError

    data = write_shards(digits(), tmp_path / "five", limit=5)
    with pytest.raises(UserError, match="5 samples, fewer than the 8 reader slots .*lower data.num_workers"):
        make_loader(open_dataset(str(data)), 1, 0, 0, 4, 1, world_size=2)


def test_streams_that_cannot_seek_warn_with_their_read_factor(digits_dir):
    from gan_dist.run import data_warnings

    assert data_warnings(open_dataset(str(digits_dir)), 32) == []  # local: one seek per piece
    piped = data_warnings(open_dataset(f"pipe:cat {digits_dir}/index.json"), 32)
    assert len(piped) == 1 and "cannot seek" in piped[0] and "32 reader slots" in piped[0]
    pattern = data_warnings(open_dataset(str(digits_dir / "shard-{000000..000007}.tar")), 32)
    assert len(pattern) == 1 and "reads 32.0x its bytes" in pattern[0] and "every shard" in pattern[0]
