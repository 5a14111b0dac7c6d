"""Test hooks: SIGKILL this process at a named point of the loop, to prove that a run killed
anywhere resumes to the uninterrupted run's end, and a full disk at a checkpoint file
(tests/test_chaos.py).

    GAN_DIST_KILL_AT=checkpoint_committed:2 GAN_DIST_KILL_MARKER=PATH python train.py ...

kills at the second arrival at `checkpoint_committed`, after writing "checkpoint_committed 2"
to PATH (so that the test knows the point was reached, not that the run died elsewhere).
GAN_DIST_KILL_RANK=R limits the kill to global rank R.
GAN_DIST_ENOSPC_AT=RANK:N makes the N-th checkpoint file that rank RANK writes fail with
ENOSPC. Unset, each hook is one comparison: the variables are read once, at import.
"""

from __future__ import annotations

import errno
import os
import signal

POINTS = ("step", "d_step", "checkpoint_files", "checkpoint_committed", "sample_grid", "eval")


def _target() -> tuple[str, int] | None:
    value = os.environ.get("GAN_DIST_KILL_AT", "")
    if not value:
        return None
    name, _, count = value.partition(":")
    if name not in POINTS:
        raise ValueError(f"GAN_DIST_KILL_AT={value}: the points are {', '.join(POINTS)}")
    return name, int(count or 1)


# GAN_DIST_KILL_RANK=R: only the process of global rank R dies (the others live on).
_TARGET = _target() if os.environ.get("GAN_DIST_KILL_RANK", os.environ.get("RANK", "0")) == os.environ.get(
    "RANK", "0") else None
_arrivals: dict[str, int] = {}


def point(name: str) -> None:
    """Reached `name`: the process dies here if GAN_DIST_KILL_AT names this arrival."""
    if _TARGET is None or _TARGET[0] != name:
        return
    _arrivals[name] = _arrivals.get(name, 0) + 1
    if _arrivals[name] == _TARGET[1]:
        marker = os.environ.get("GAN_DIST_KILL_MARKER")
        if marker:
            with open(marker, "w") as out:
                out.write(f"{name} {_arrivals[name]}\n")
        os.kill(os.getpid(), signal.SIGKILL)


def _disk_full_target() -> tuple[int, int] | None:
    value = os.environ.get("GAN_DIST_ENOSPC_AT", "")
    if not value:
        return None
    rank, _, count = value.partition(":")
    return int(rank), int(count or 1)


_DISK_FULL = _disk_full_target()
_files_written: dict[int, int] = {}


def file_written(rank: int) -> None:
    """A checkpoint file written by `rank`: the disk is full here if GAN_DIST_ENOSPC_AT says so."""
    if _DISK_FULL is None or _DISK_FULL[0] != rank:
        return
    _files_written[rank] = _files_written.get(rank, 0) + 1
    if _files_written[rank] == _DISK_FULL[1]:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
