"""gan-dist prepare (digits, mixtures, torchvision MNIST) and the deterministic shard stream."""

import hashlib
import itertools
import json

import numpy as np
import pytest
from conftest import write_idx_mnist

from gan_dist.cli import main as cli_main
from gan_dist.data.sources import digits, mixture
from gan_dist.data.stream import make_loader, open_dataset
from gan_dist.data.toy import grid25_modes, ring8_modes
from gan_dist.errors import UserError


def test_shards_are_reproducible(tmp_path, capsys):
    for out in ("a", "b"):
        assert cli_main(["prepare", "digits", "--out", str(tmp_path / out)]) == 0
    index_a, index_b = (json.loads((tmp_path / o / "index.json").read_text()) for o in "ab")
    assert index_a["shards"] == index_b["shards"]


def test_automatic_shards_are_balanced():
    from gan_dist.data.prepare import shard_bounds

    for count in (5, 26, 40, 1797, 60_000, 1_000_003):
        bounds = shard_bounds(count)
        sizes = [stop - start for start, stop in bounds]
        assert bounds[0][0] == 0 and bounds[-1][1] == count and all(a[1] == b[0] for a, b in itertools.pairwise(bounds))
        assert len(bounds) >= min(8, count) and max(sizes) <= 10_000 and max(sizes) - min(sizes) <= 1
    assert shard_bounds(10, 4) == [(0, 4), (4, 8), (8, 10)]


def test_prepare_digits_writes_index_and_checksums(tmp_path, capsys):
    assert cli_main(["prepare", "digits", "--out", str(tmp_path / "d"), "--shard-size", "500"]) == 0
    index = json.loads((tmp_path / "d" / "index.json").read_text())
    assert index["count"] == 1797 and index["shape"] == [1, 8, 8] and index["dtype"] == "uint8"
    assert index["classes"] == [str(i) for i in range(10)]
    assert [s["count"] for s in index["shards"]] == [500, 500, 500, 297]
    for shard in index["shards"]:
        assert hashlib.sha256((tmp_path / "d" / shard["name"]).read_bytes()).hexdigest() == shard["sha256"]
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir()), "temporary directory left behind"


def test_prepare_refuses_to_overwrite_without_force(tmp_path, capsys):
    out = str(tmp_path / "d")
    assert cli_main(["prepare", "digits", "--out", out]) == 0
    assert cli_main(["prepare", "digits", "--out", out]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert cli_main(["prepare", "digits", "--out", out, "--force"]) == 0


def test_digits_pixels_span_uint8():
    arrays = digits()
    assert arrays.samples.dtype == np.uint8 and arrays.samples.max() == 255 and arrays.samples.min() == 0
    assert len(arrays.samples) == 1797


@pytest.mark.parametrize("name, modes, std", [("ring8", ring8_modes(), 0.01), ("grid25", grid25_modes(), 0.05)])
def test_mixtures_follow_the_pacgan_protocol(tmp_path, name, modes, std):
    arrays = mixture(name)
    assert arrays.samples.shape == (100_000, 2) and arrays.samples.dtype == np.float32
    assert np.bincount(arrays.labels).min() > 100_000 / len(modes) * 0.9
    offsets = arrays.samples - modes[arrays.labels]
    assert offsets.std() == pytest.approx(std, rel=0.1)
    assert np.abs(offsets).max() < 6 * std
    # Through the CLI and the stream (a prefix, to keep the test fast).
    assert cli_main(["prepare", name, "--out", str(tmp_path / name), "--limit", "3000"]) == 0
    info = open_dataset(str(tmp_path / name))
    assert info.count == 3000 and info.shape == (2,) and info.dtype == "float32"
    assert len(info.classes) == len(modes)
    points, labels = next(iter(make_loader(info, 256, 0, 0, 0, 100, conditional=True)))[:2]
    assert np.abs(points.numpy() - modes[labels.numpy()]).max() < 6 * std


def test_prepare_mnist_from_torchvision_files(tmp_path, capsys):
    root = write_idx_mnist(tmp_path / "raw_root", num_train=40, num_test=12)
    assert cli_main(["prepare", "torchvision", "MNIST", "--root", str(root), "--out", str(tmp_path / "m")]) == 0
    info = open_dataset(str(tmp_path / "m"))
    assert info.count == 40 and info.shape == (1, 28, 28) and info.num_classes == 10
    assert cli_main(["prepare", "torchvision", "MNIST", "--root", str(root), "--split", "test",
                     "--resolution", "32", "--out", str(tmp_path / "t")]) == 0
    test_info = open_dataset(str(tmp_path / "t"))
    assert test_info.count == 12 and test_info.shape == (1, 32, 32)


@pytest.mark.parametrize("name, where", [("MNIST", "MNIST/raw"), ("CIFAR10", "cifar-10-batches-py")])
def test_prepare_torchvision_without_files_says_where_to_put_them(tmp_path, capsys, name, where):
    code = cli_main(["prepare", "torchvision", name, "--root", str(tmp_path), "--out", str(tmp_path / "m"),
                     "--no-download"])
    assert code == 2
    err = capsys.readouterr().err
    assert f"{name} files not found under {tmp_path}/{where}" in err and "Traceback" not in err
    assert not (tmp_path / "m").exists()


def test_prepare_torchvision_arguments_are_checked(tmp_path, capsys):
    assert cli_main(["prepare", "torchvision", "CIFAR100", "--root", str(tmp_path), "--out", str(tmp_path / "m")]) == 2
    assert "choose one of: MNIST, FashionMNIST, CIFAR10" in capsys.readouterr().err
    assert cli_main(["prepare", "torchvision", "CIFAR10", "--out", str(tmp_path / "m")]) == 2
    assert "needs the directory with torchvision's files: pass --root DIR" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["prepare", "torchvision", "CIFAR10", "--root", str(tmp_path), "--split", "val", "--out", "x"])


def _keys(loader, num_batches):
    return [k for batch in itertools.islice(iter(loader), num_batches) for k in batch.keys]


def test_stream_is_deterministic_and_rank_dependent(digits_dir):
    info = open_dataset(str(digits_dir))
    first = _keys(make_loader(info, 16, seed=3, rank=0, num_workers=0, shuffle_buffer=100, world_size=2), 5)
    again = _keys(make_loader(info, 16, seed=3, rank=0, num_workers=0, shuffle_buffer=100, world_size=2), 5)
    other_rank = _keys(make_loader(info, 16, seed=3, rank=1, num_workers=0, shuffle_buffer=100, world_size=2), 5)
    other_seed = _keys(make_loader(info, 16, seed=4, rank=0, num_workers=0, shuffle_buffer=100, world_size=2), 5)
    assert first == again
    assert first != other_rank and first != other_seed


def test_stream_is_deterministic_with_workers(digits_dir):
    info = open_dataset(str(digits_dir))
    runs = [_keys(make_loader(info, 8, seed=1, rank=0, num_workers=2, shuffle_buffer=50), 6) for _ in range(2)]
    assert runs[0] == runs[1]


def test_stream_is_endless_and_batches_are_uint8(digits_dir):
    info = open_dataset(str(digits_dir))
    batches = list(itertools.islice(iter(make_loader(info, 100, 0, 0, 0, 10)), 30))  # 3000 > 1797 samples
    images, labels, keys = batches[-1][:3]
    assert images.dtype.is_floating_point is False and images.shape == (100, 1, 8, 8)
    assert labels.shape == (100,) and len(keys) == 100


@pytest.mark.parametrize("setup, match", [
    (lambda p: None, "does not exist; write the dataset there"),
    (lambda p: p.mkdir(), "has no index.json"),
])
def test_missing_data_is_a_user_error(tmp_path, setup, match):
    path = tmp_path / "nothing"
    setup(path)
    with pytest.raises(UserError, match=match):
        open_dataset(str(path))


def test_missing_and_empty_shards_are_user_errors(tmp_path, digits_dir):
    with pytest.raises(UserError, match="1 of 1 shards are missing"):
        open_dataset(str(tmp_path / "shard-{000000..000000}.tar"))
    (tmp_path / "empty.tar").write_bytes(b"")
    with pytest.raises(UserError, match="is empty"):
        open_dataset(str(tmp_path / "empty.tar"))
    pattern = str(digits_dir / "shard-{000000..000001}.tar")
    info = open_dataset(pattern)
    assert info.shape == (1, 8, 8) and len(info.urls) == 2
