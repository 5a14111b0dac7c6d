"""Shared fixtures: small datasets written by the tests themselves, and in-process runs."""

from __future__ import annotations

import os
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
HELPERS = Path(__file__).resolve().parent / "helpers"
sys.path.insert(0, str(HELPERS))

LAUNCH_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    """The 8x8 digits as shards of 256 in chunks of 64, prepared once for the session (the
    automatic chunk would hold a whole shard: cut smaller, pieces start and end inside chunks)."""
    from gan_dist.data.prepare import write_shards
    from gan_dist.data.sources import digits

    return write_shards(digits(), tmp_path_factory.mktemp("data") / "digits", shard_size=256, chunk=64)


@pytest.fixture(autouse=True)
def clean_process_state(monkeypatch):
    """Each test starts without launcher variables or accelerate's process-wide state."""
    for var in LAUNCH_ENV + tuple(v for v in os.environ if v.startswith("ACCELERATE_")):
        monkeypatch.delenv(var, raising=False)
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    torch.autograd.set_detect_anomaly(False)
    torch.use_deterministic_algorithms(False)


@pytest.fixture
def train_main(tmp_path, monkeypatch, capsys):
    """Run gan_dist.train.main in this process from a scratch directory; returns (code, out, err)."""
    from gan_dist.train import main

    monkeypatch.chdir(tmp_path)

    def run(*argv: str) -> tuple[int, str, str]:
        code = main(list(argv))
        out, err = capsys.readouterr()
        return code, out, err

    return run


def tiny_args(digits_dir: Path, *extra: str) -> list[str]:
    return ["--config", str(ROOT / "configs" / "tiny.yaml"), f"data.path={digits_dir}", *extra]


def write_idx_mnist(root: Path, num_train: int = 64, num_test: int = 16, seed: int = 0) -> Path:
    """A tiny MNIST in torchvision's raw layout (idx files) under root/MNIST/raw."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for prefix, count in (("train", num_train), ("t10k", num_test)):
        images = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
        labels = (np.arange(count) % 10).astype(np.uint8)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">iiii", 2051, count, 28, 28) + images.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">ii", 2049, count) + labels.tobytes())
    return root
