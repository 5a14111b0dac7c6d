"""Progress of one long step outside the training loop (prepare, reference features, the cls
classifier): a rich bar on a terminal, plain rate-limited lines everywhere else.

Without a terminal (SLURM logs, pipes, CI) a rich bar prints nothing until it ends, so the
log would stay silent for minutes; plain lines say the step started, how far it is (at most
every HEARTBEAT_S, or at each STEP_FRACTION of the total, never closer than MIN_GAP_S) and
how long it took. Processes other than rank 0 pass enabled=False and print nothing.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

HEARTBEAT_S = 10.0  # a plain line at least this often while the step advances
STEP_FRACTION = 0.1  # and one at every tenth of the total...
MIN_GAP_S = 1.0  # ...but a fast step does not print its tenths closer together than this


class TaskProgress(Protocol):
    def advance(self, n: int = 1, **fields) -> None:
        """n more items done; fields (loss=0.3, epoch="2/8") are shown from now on."""

    def update(self, **fields) -> None:
        """Change the shown fields without advancing."""


# task_progress with its description (and enabled/console) already bound: what the long
# loops take, so that their callers decide the wording and which rank prints.
ProgressFactory = Callable[[int | None, str], AbstractContextManager[TaskProgress]]


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _fields_text(fields: dict) -> str:
    return ", ".join(f"{name} {_fmt(value)}" for name, value in fields.items())


def format_duration(seconds: float) -> str:
    """'8.2 s', '7 min 22 s', '2 h 05 min': a log line is read by people, not parsed."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes} min {secs:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


class _Quiet:
    def advance(self, n: int = 1, **fields) -> None:
        pass

    def update(self, **fields) -> None:
        pass


class _Bar:
    """A rich task; the fields go into one text column."""

    def __init__(self, progress: Progress, task):
        self.progress, self.task, self.fields = progress, task, {}

    def advance(self, n: int = 1, **fields) -> None:
        self.fields.update(fields)
        self.progress.update(self.task, advance=n, info=escape(_fields_text(self.fields)))

    def update(self, **fields) -> None:
        self.advance(0, **fields)


class _Lines:
    """Plain lines: start, rate-limited middle lines, and the end (or where it stopped)."""

    def __init__(self, description: str, total: int | None, unit: str, write: Callable[[str], None],
                 clock: Callable[[], float], heartbeat_s: float, min_gap_s: float):
        self.description, self.total, self.unit, self.write, self.clock = description, total, unit, write, clock
        self.heartbeat_s, self.min_gap_s = heartbeat_s, min_gap_s
        self.count, self.fields = 0, {}
        self.started_s = self.last_line_s = clock()
        self.next_mark = self._mark_after(0)
        write(f"{description}: started" + (f", {total} {unit}" if total else ""))

    def _mark_after(self, count: int) -> float:
        """A tenth of the total past `count`, the last line's: counted from the line, not from
        round tenths, so that a heartbeat just before a tenth is not followed by a near copy."""
        return count + self.total * STEP_FRACTION if self.total else float("inf")

    def advance(self, n: int = 1, **fields) -> None:
        self.count += n
        self.fields.update(fields)
        now = self.clock()
        since_s = now - self.last_line_s
        if self.total and self.count >= self.total:
            return  # the closing line follows
        if since_s >= self.heartbeat_s or (self.count >= self.next_mark and since_s >= self.min_gap_s):
            self.write(f"{self.description}: {self._counted()}, {format_duration(now - self.started_s)}, "
                       f"{self._rate(now)}{self._extra()}")
            self.last_line_s, self.next_mark = now, self._mark_after(self.count)

    def update(self, **fields) -> None:
        self.fields.update(fields)

    def close(self, finished: bool) -> None:
        now = self.clock()
        elapsed = format_duration(now - self.started_s)
        if finished:
            self.write(f"{self.description}: done, {self._counted(percent=False)} in {elapsed} "
                       f"({self._rate(now)}){self._extra()}")
        else:
            self.write(f"{self.description}: stopped at {self._counted()} after {elapsed}{self._extra()}")

    def _counted(self, percent: bool = True) -> str:
        if not self.total:
            return f"{self.count} {self.unit}"
        share = f" ({self.count / self.total:.0%})" if percent else ""
        return f"{self.count}/{self.total} {self.unit}{share}"

    def _rate(self, now: float) -> str:
        per_s = self.count / max(now - self.started_s, 1e-9)
        shown = f"{per_s:.0f}" if per_s >= 10 else f"{per_s:.1f}" if per_s >= 1 else f"{per_s:.2g}"
        return f"{shown} {self.unit}/s"

    def _extra(self) -> str:
        return f", {_fields_text(self.fields)}" if self.fields else ""


@contextmanager
def task_progress(description: str, total: int | None, unit: str = "items", enabled: bool = True, *,
                  tty: bool | None = None, console: Console | None = None, heartbeat_s: float = HEARTBEAT_S,
                  min_gap_s: float = MIN_GAP_S, clock: Callable[[], float] = time.monotonic) -> Iterator[TaskProgress]:
    """Show one long step. tty None: a bar when the console (default: stdout) is a terminal.
    Pass the training console's rich Console during training: rich then nests this bar under
    the training bar instead of two live displays overwriting each other."""
    if not enabled:
        yield _Quiet()
        return
    if console is None:
        tty = sys.stdout.isatty() if tty is None else tty
        # The same decision as the training console: a terminal only where stdout is one.
        console = Console(force_terminal=tty, highlight=False, soft_wrap=not tty)
    elif tty is None:
        tty = console.is_terminal
    if tty:
        with _bar(console, description, total, unit) as bar:
            yield bar
        return
    lines = _Lines(description, total, unit, lambda line: console.print(line, markup=False, highlight=False,
                                                                        soft_wrap=True),
                   clock, heartbeat_s, min_gap_s)
    try:
        yield lines
    except BaseException:
        lines.close(finished=False)
        raise
    lines.close(finished=True)


@contextmanager
def _bar(console: Console, description: str, total: int | None, unit: str) -> Iterator[_Bar]:
    # Not transient: the finished line stays, with its count and elapsed time.
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn(unit),
               TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"))
    with Progress(*columns, console=console, transient=False) as progress:
        yield _Bar(progress, progress.add_task(escape(description), total=total, info=""))
