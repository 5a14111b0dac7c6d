"""gan-dist prepare: image folders, formats, parallel writing, --verify, and pixel round trips."""

import json

import numpy as np
import pytest
from PIL import Image

from gan_dist.cli import main as cli_main
from gan_dist.data.prepare import write_shards
from gan_dist.data.sources import ArraySource
from gan_dist.data.stream import make_loader, open_dataset


def _image_folder(root, sizes=((12, 10),) * 6, classes=("cat", "dog")):
    """Images in class subfolders, each a distinct gradient so that crops can be checked."""
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(sizes):
        folder = root / classes[i % len(classes)] / ("nested" if i % 3 == 0 else "")
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i}.{'png' if i % 2 else 'bmp'}")
    return root


def _read_all(path, conditional=True):
    info = open_dataset(str(path))
    batches = list(make_loader(info, 1, seed=0, rank=0, num_workers=0, shuffle_buffer=1,
                               conditional=conditional, num_epochs=1))
    return {int(b.keys[0]): (b.samples[0].numpy(), int(b.labels[0])) for b in batches if len(b.keys)}, info


def test_imagefolder_labels_from_subfolders_and_skips_unreadable(tmp_path, capsys):
    root = _image_folder(tmp_path / "imgs")
    (root / "dog" / "notes.txt").write_text("not an image")
    Image.new("RGB", (12, 10)).save(root / "loose.png")
    (root / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    assert cli_main(["prepare", "imagefolder", str(root), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "skipped dog/notes.txt" in out and "skipped cat/broken.png" in out
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert index["count"] == 6 and index["shape"] == [3, 10, 12] and index["classes"] == ["cat", "dog"]
    assert sorted(s["file"] for s in index["skipped"]) == ["cat/broken.png", "dog/notes.txt", "loose.png"]
    samples, _ = _read_all(tmp_path / "out")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.parent != root)
    for key, (array, label) in samples.items():
        path = files[int(key)]
        assert label == ["cat", "dog"].index(path.relative_to(root).parts[0])
        assert np.array_equal(array, np.asarray(Image.open(path).convert("RGB")).transpose(2, 0, 1))


def test_imagefolder_resolution_resizes_and_centre_crops(tmp_path, capsys):
    root = _image_folder(tmp_path / "imgs", sizes=[(40, 20), (20, 30), (16, 16)])
    assert cli_main(["prepare", "imagefolder", str(root), "--out", str(tmp_path / "out"),
                     "--resolution", "8", "--channels", "1"]) == 0
    samples, info = _read_all(tmp_path / "out")
    assert info.shape == (1, 8, 8) and len(samples) == 3
    files = sorted(p for p in root.rglob("*") if p.is_file())
    wide_index = next(i for i, p in enumerate(files) if p.stem == "img0")  # 40x20: resized to 16x8, cropped
    wide = Image.open(files[wide_index]).convert("L").resize((16, 8), Image.BICUBIC).crop((4, 0, 12, 8))
    assert np.array_equal(samples[wide_index][0][0], np.asarray(wide))


def test_imagefolder_of_mixed_sizes_needs_resolution(tmp_path, capsys):
    root = _image_folder(tmp_path / "imgs", sizes=[(12, 10), (14, 10)])
    assert cli_main(["prepare", "imagefolder", str(root), "--out", str(tmp_path / "out")]) == 2
    assert "pass --resolution N" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


@pytest.mark.parametrize("fmt", ["npy", "png"])
def test_pixels_and_labels_round_trip(tmp_path, fmt):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(37, 3, 6, 5), dtype=np.uint8)
    labels = rng.integers(0, 4, size=37)
    write_shards(ArraySource(images, labels, list("abcd"), "random"), tmp_path / "d", shard_size=10, fmt=fmt)
    samples, _ = _read_all(tmp_path / "d")
    assert len(samples) == 37
    for key, (array, label) in samples.items():
        assert np.array_equal(array, images[int(key)]) and label == labels[int(key)]


def test_jpeg_is_close_and_points_need_npy(tmp_path, capsys):
    images = np.tile(np.linspace(0, 255, 16, dtype=np.uint8), (4, 1, 16, 1))
    write_shards(ArraySource(images, np.zeros(4, int), [], "ramp"), tmp_path / "j", fmt="jpg")
    samples, _ = _read_all(tmp_path / "j", conditional=False)
    assert all(np.abs(a.astype(int) - images[0]).max() <= 4 for a, _ in samples.values())
    assert cli_main(["prepare", "ring8", "--out", str(tmp_path / "r"), "--format", "png", "--limit", "10"]) == 2
    assert "use --format npy" in capsys.readouterr().err


def test_parallel_writing_gives_identical_shards(tmp_path, capsys):
    for workers in ("1", "2"):
        assert cli_main(["prepare", "digits", "--out", str(tmp_path / workers), "--format", "png",
                         "--workers", workers]) == 0
    one, two = (json.loads((tmp_path / w / "index.json").read_text()) for w in "12")
    assert one == two and len(one["shards"]) == 8


def test_verify_finds_a_changed_shard(tmp_path, capsys):
    out = tmp_path / "d"
    assert cli_main(["prepare", "digits", "--out", str(out), "--shard-size", "600"]) == 0
    assert cli_main(["prepare", "--verify", str(out)]) == 0
    assert "every shard matches" in capsys.readouterr().out
    shard = out / "shard-000001.tar"
    data = bytearray(shard.read_bytes())
    data[1000] ^= 0xFF
    shard.write_bytes(bytes(data))
    (out / "shard-000002.tar").unlink()
    assert cli_main(["prepare", "--verify", str(out)]) == 2
    err = capsys.readouterr().err
    assert "2 bad shards" in err and "shard-000001.tar: sha256 differs" in err and "shard-000002.tar: missing" in err


def test_prepare_without_source_or_out_says_how(tmp_path, capsys):
    assert cli_main(["prepare", "digits"]) == 2
    assert "needs a source and --out DIR" in capsys.readouterr().err
    assert cli_main(["prepare", "imagefolder", "--out", str(tmp_path / "o")]) == 2
    assert "imagefolder needs the folder" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["digits", "--resolution", "-3"], "--resolution -3: give N for N x N pixels or HxW"),
    (["digits", "--limit", "-1"], "--limit must be >= 0, got -1"),
    (["digits", "--workers", "0"], "--workers must be >= 1, got 0"),
    (["digits", "--channels", "1"], "--channels applies to imagefolder only"),
])
def test_bad_prepare_arguments_exit_2(tmp_path, capsys, argv, message):
    assert cli_main(["prepare", *argv, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_verify_rejects_a_foreign_index(tmp_path, capsys):
    (tmp_path / "index.json").write_text('{"shards": [{"name": 1}]}')
    assert cli_main(["prepare", "--verify", str(tmp_path)]) == 2
    assert "is not a gan-dist prepare index" in capsys.readouterr().err


def test_stale_temporary_directories_are_cleared(tmp_path, capsys):
    (tmp_path / ".d.tmp-999999").mkdir()
    assert cli_main(["prepare", "digits", "--out", str(tmp_path / "d")]) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["d"]
