"""Test hooks: SIGKILL this process at a named point of the loop, to prove that a run killed
anywhere resumes to the uninterrupted run's end, and a full disk at a checkpoint file
(tests/test_chaos.py).

    GAN_DIST_KILL_AT=checkpoint_committed:2 GAN_DIST_KILL_MARKER=PATH python train.py ...

kills at the second arrival at `checkpoint_committed`, after writing "checkpoint_committed 2"
to PATH (so that the test knows the point was reached, not that the run died elsewhere).
GAN_DIST_KILL_RANK=R limits the kill to global rank R.
GAN_DIST_ENOSPC_AT=RANK:N makes the N-th checkpoint file that rank RANK writes fail as on a
full disk (the writer's own error; `latest` is rank 0's last file). Unset, each hook is one
comparison: the variables are read once, at import.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
from pathlib import Path

POINTS = ("step", "d_step", "checkpoint_files", "checkpoint_committed", "sample_grid", "eval")


def _where_and_when(variable: str) -> tuple[str, int] | None:
    """WHERE:N from the environment: (WHERE, N), N defaulting to 1; None when unset."""
    value = os.environ.get(variable, "")
    if not value:
        return None
    where, _, count = value.partition(":")
    return where, int(count or 1)


def _kill_target() -> tuple[str, int] | None:
    target = _where_and_when("GAN_DIST_KILL_AT")
    if target is not None and target[0] not in POINTS:
        raise ValueError(f"GAN_DIST_KILL_AT={target[0]}: the points are {', '.join(POINTS)}")
    # GAN_DIST_KILL_RANK=R: only the process of global rank R dies (the others live on).
    rank = os.environ.get("RANK", "0")
    return target if os.environ.get("GAN_DIST_KILL_RANK", rank) == rank else None


_TARGET = _kill_target()
_arrivals: dict[str, int] = {}


def _due(target: tuple | None, where, counts: dict) -> bool:
    """One more arrival at `where`; True at the one `target` (where, N) names."""
    if target is None or target[0] != where:
        return False
    counts[where] = counts.get(where, 0) + 1
    return counts[where] == target[1]


def point(name: str) -> None:
    """Reached `name`: the process dies here if GAN_DIST_KILL_AT names this arrival."""
    if _due(_TARGET, name, _arrivals):
        marker = os.environ.get("GAN_DIST_KILL_MARKER")
        if marker:
            with open(marker, "w") as out:
                out.write(f"{name} {_arrivals[name]}\n")
        os.kill(os.getpid(), signal.SIGKILL)


_disk_full_at = _where_and_when("GAN_DIST_ENOSPC_AT")
_DISK_FULL = None if _disk_full_at is None else (int(_disk_full_at[0]), _disk_full_at[1])
_files_written: dict[int, int] = {}
_disk_filled = False  # once the hook has filled the disk, it stays full for free_bytes


def file_written(rank: int, path: Path) -> None:
    """A checkpoint file written by `rank`: the disk is full here if GAN_DIST_ENOSPC_AT says so,
    and the error is the one that file's writer raises on a full disk."""
    global _disk_filled
    if _due(_DISK_FULL, rank, _files_written):
        _disk_filled = True
        raise full_disk_error(path)


def full_disk_error(path: Path) -> Exception:
    """What each writer raises on a full disk (measured on /dev/full and a full tmpfs):
    torch.save an error that names no cause, safetensors one that names the OS error."""
    if path.suffix == ".pt":
        return RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError

        return SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def free_bytes(directory: Path) -> int:
    """Free space where `directory` is (none once the hook filled the disk)."""
    return 0 if _disk_filled else shutil.disk_usage(directory).free
