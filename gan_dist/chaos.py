"""Test hook: SIGKILL this process at a named point of the loop, to prove that a run killed
anywhere resumes to the uninterrupted run's end (tests/test_chaos.py).

    GAN_DIST_KILL_AT=checkpoint_committed:2 GAN_DIST_KILL_MARKER=PATH python train.py ...

kills at the second arrival at `checkpoint_committed`, after writing "checkpoint_committed 2"
to PATH (so that the test knows the point was reached, not that the run died elsewhere).
Unset, `point()` is one comparison: the variable is read once, at import.
"""

from __future__ import annotations

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


_TARGET = _target()
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
