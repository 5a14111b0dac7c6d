"""Non-square images end to end: a folder of photos of mixed sizes prepared at 32x64 (height
first), trained with r3gan and ADA, sampled, exported and sampled again from the export."""

import json

import numpy as np
import pytest
from conftest import ROOT
from PIL import Image

from gan_dist.cli import main as cli_main
from gan_dist.data.sources import parse_resolution


def _photos(root, count=24):
    """Landscape and portrait photos of random sizes in two class folders."""
    rng = np.random.default_rng(0)
    for i in range(count):
        width, height = (int(rng.integers(40, 90)), int(rng.integers(30, 60)))[:: 1 if i % 3 else -1]
        folder = root / ("wide" if i % 2 else "tall")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


def test_a_32x64_folder_prepares_trains_samples_and_exports(train_main, tmp_path, capsys):
    data = tmp_path / "data"
    assert cli_main(["prepare", "imagefolder", str(_photos(tmp_path / "photos")), "--out", str(data),
                     "--resolution", "32x64"]) == 0
    assert json.loads((data / "index.json").read_text())["shape"] == [3, 32, 64]
    code, _, err = train_main("--config", str(ROOT / "configs" / "tiny.yaml"), f"data.path={data}", "model.name=r3gan",
                                "model.width_mult=0.0105", "model.g_norm=none", "model.d_norm=none",
                                "loss.name=relativistic", "loss.r2=true", "loss.r1_gamma=0.1", "data.augment=bgc",
                                "data.ada_kimg=1", "data.augment_p=0.2", "train.batch_size=8", "train.max_steps=3",
                                "log.every_steps=1", "run.name=wide")
    assert code == 0, err
    grid = np.asarray(Image.open(tmp_path / "runs" / "wide" / "samples" / "final.png"))
    cell_height, cell_width = _cell(grid)
    assert cell_width == 2 * cell_height, (cell_height, cell_width)  # samples are 32x64, not squares
    model = tmp_path / "model"
    assert cli_main(["export", "--run", str(tmp_path / "runs" / "wide"), "--out", str(model)]) == 0
    assert cli_main(["sample", "--model", str(model), "--num", "3", "--out", str(tmp_path / "one")]) == 0
    files = sorted((tmp_path / "one").glob("*.png"))
    assert len(files) == 3 and all(Image.open(f).size == (64, 32) for f in files)


def _cell(grid: np.ndarray) -> tuple[int, int]:
    """The size of one cell of a sample grid: runs between the grid's separator lines."""
    separator = grid.reshape(grid.shape[0], grid.shape[1], -1).max(2)
    rows = np.flatnonzero((separator == separator[0, 0]).all(1))
    cols = np.flatnonzero((separator == separator[0, 0]).all(0))
    return int(np.diff(rows).max() - 1), int(np.diff(cols).max() - 1)


@pytest.mark.parametrize("text, expected", [("32", 32), ("32x64", (32, 64)), ("64X32", (64, 32)), ("16x16", 16)])
def test_resolution_is_n_or_height_x_width(text, expected):
    assert parse_resolution(text) == expected


@pytest.mark.parametrize("text", ["32x", "0x64", "a", "32x64x2"])
def test_a_bad_resolution_exits_2(tmp_path, capsys, text):
    assert cli_main(["prepare", "digits", "--out", str(tmp_path / "out"), "--resolution", text]) == 2
    assert "--resolution" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_a_size_no_conv_model_takes_is_written_with_a_note(tmp_path, capsys):
    assert cli_main(["prepare", "digits", "--out", str(tmp_path / "out"), "--resolution", "30"]) == 0
    assert "30x30 suits model.name=mlp only" in capsys.readouterr().out
    assert cli_main(["prepare", "digits", "--out", str(tmp_path / "ok"), "--resolution", "16x32"]) == 0
    assert "note:" not in capsys.readouterr().out
