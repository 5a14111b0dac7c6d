"""Stopping cleanly when the cluster says so: SIGTERM, SIGUSR1, or a first Ctrl-C.

The signal may reach every rank, only rank 0 (a launcher that forwards it), or only some
ranks, so no rank acts on it alone: every few steps all ranks combine their flags in one
tiny all-reduce, read at the next check (parallel.RankVote: no host read of the device at
the check itself), and if any rank was signalled they all finish that step, save a checkpoint
and stop. Rank 0 then writes runs/<name>/REQUEUE: launchers (torchrun, accelerate launch,
srun) replace the exit code with their own, so scripts decide on requeueing by this marker.
A second Ctrl-C exits at once. DataLoader workers ignore these signals: a launcher signals
the whole process group, and a worker that died first would take the checkpoint with it.
"""

from __future__ import annotations

import atexit
import signal
import threading
import weakref
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # typing.Self is Python 3.11+; annotations are never evaluated here
    from typing_extensions import Self

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
CHECK_EVERY_STEPS = 5
REQUEUE_MARKER = "REQUEUE"


class StopRequest:
    def __init__(self):
        self.signal_name = ""
        self._previous = {}
        self._vote = None  # made at the first multi-process check

    def __enter__(self) -> Self:
        """Handlers for the run only (signal handlers can only be set in the main thread)."""
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame) -> None:
        if signum == signal.SIGINT and self.signal_name:
            raise KeyboardInterrupt  # the second Ctrl-C: no checkpoint, stop now
        self.signal_name = signal.Signals(signum).name

    def decided(self, accelerator, step: int) -> str:
        """The signal every rank stops for ('' if none): collective, every CHECK_EVERY_STEPS steps,
        acted on one check after the signal arrived (10 steps at most)."""
        if accelerator.num_processes == 1:
            return self.signal_name
        if step % CHECK_EVERY_STEPS:
            return ""
        if self._vote is None:
            from gan_dist.parallel import RankVote

            self._vote = RankVote(accelerator, lag=1)
        if not self._vote.vote(bool(self.signal_name)):
            return ""
        return self.signal_name or "a signal to another rank"


def ignore_stop_signals(_worker_id: int) -> None:
    """DataLoader worker_init_fn."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


_LIVE_WORKER_ITERATORS: weakref.WeakSet = weakref.WeakSet()


def shut_down_at_exit(iterator) -> None:
    """Stop this DataLoader iterator's workers when the interpreter exits.

    Python's exit ends daemonic children with SIGTERM, then joins them; workers that ignore
    SIGTERM (above) would make that join wait for ever while the iterator is still referenced
    (a global in a script). This hook runs first (atexit is last-in, first-out, and
    multiprocessing registered its own at import) and asks the workers to stop the way the
    iterator's own __del__ does."""
    if not _LIVE_WORKER_ITERATORS:
        atexit.unregister(_shut_down_live_iterators)
        atexit.register(_shut_down_live_iterators)
    _LIVE_WORKER_ITERATORS.add(iterator)


def _shut_down_live_iterators() -> None:
    for iterator in list(_LIVE_WORKER_ITERATORS):
        iterator._shutdown_workers()  # torch's own shutdown path (also called by its __del__)


def write_requeue_marker(run_dir: Path, signal_name: str, step: int, checkpoint: Path) -> None:
    (run_dir / REQUEUE_MARKER).write_text(f"{signal_name} at step {step}; resume from {checkpoint}\n")


def clear_requeue_marker(run_dir: Path) -> None:
    (run_dir / REQUEUE_MARKER).unlink(missing_ok=True)
