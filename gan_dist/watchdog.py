"""A step watchdog: a rank that makes no progress for dist.timeout_s shows where it is and exits.

A hung multi-node run otherwise sits silently until the collective timeout, and then says
only which collective timed out, not which rank or what that rank was doing. The trainer
calls `arm()` before every step and before sampling and saving; arming only stores a
deadline, so it costs nothing per step. A daemon thread checks the deadline; when it passes
it prints "[rank R] ..." and every thread's Python stack to stderr, then exits the process.
If the interpreter itself is stuck (a C call holding the GIL), faulthandler's own C-level
timer, pushed back by the thread while it runs, dumps the stacks shortly after instead.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # typing.Self is Python 3.11+; annotations are never evaluated here
    from typing_extensions import Self

BACKSTOP_S = 30.0


class StepWatchdog:
    def __init__(self, timeout_s: float, rank: int, file=None):
        self.timeout_s, self.rank = timeout_s, rank
        self.file = file if file is not None else sys.stderr
        self.deadline = time.monotonic() + timeout_s
        self.what = "starting"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="gan_dist-watchdog", daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        faulthandler.cancel_dump_traceback_later()

    def arm(self, what: str) -> None:
        """No progress for timeout_s from now is a hang; `what` names the work in the message."""
        self.deadline, self.what = time.monotonic() + self.timeout_s, what

    def _watch(self) -> None:
        while not self._stop.wait(timeout=min(1.0, max(0.01, self.deadline - time.monotonic()))):
            faulthandler.dump_traceback_later(self.timeout_s + BACKSTOP_S, exit=True, file=self.file)
            if time.monotonic() >= self.deadline:
                self._fire()

    def _fire(self) -> None:
        self.file.write(f"[rank {self.rank}] no progress for {self.timeout_s:g} s ({self.what}; dist.timeout_s); "
                        "Python stacks of every thread follow, then this process exits\n")
        self.file.flush()
        faulthandler.dump_traceback(file=self.file, all_threads=True)
        self.file.flush()
        os._exit(1)
