"""What a run tells the world: rich progress on rank 0, plain lines when stdout is not a
terminal (SLURM logs), metrics.jsonl, TensorBoard through accelerate's trackers, grids.

Only rank 0 prints or writes; other ranks get a console whose methods do nothing.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from rich.console import Console as RichConsole
from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def format_elapsed(seconds: float) -> str:
    """H:MM:SS, hours unbounded (a run of days does not wrap at 24 h)."""
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


class _ElapsedColumn(ProgressColumn):
    """Training time across resumes, as the logs count it (rich's own column restarts)."""

    def render(self, task) -> Text:
        return Text(format_elapsed(task.fields["elapsed_before_s"] + (task.elapsed or 0.0)), style="progress.elapsed")


class _SpeedColumn(ProgressColumn):
    """img/s from the bar's own recent samples: live, with no device read."""

    def render(self, task) -> Text:
        return Text(f"{task.speed:.0f} img/s" if task.speed else "- img/s")


class Console:
    def __init__(self, enabled: bool, total_images: int, run_dir: Path, accelerator=None,
                 tty: bool | None = None):
        self.enabled = enabled
        self.total_images = total_images
        self.run_dir = run_dir
        self.accelerator = accelerator
        self.tty = sys.stdout.isatty() if tty is None else tty
        self.rich = RichConsole(highlight=False, force_terminal=self.tty, soft_wrap=not self.tty)
        self.progress: Progress | None = None
        # Open for the whole run (closed in close()): one line is appended per log interval.
        self._metrics_file = open(run_dir / "metrics.jsonl", "a") if enabled else None  # noqa: SIM115

    def summary(self, title: str, rows: dict[str, str]) -> None:
        if not self.enabled:
            return
        table = Table(title=title, show_header=False, title_justify="left")
        table.add_column(style="bold")
        table.add_column()
        for key, value in rows.items():
            table.add_row(key, str(value))
        self.rich.print(table)

    def print(self, message: str) -> None:
        if self.enabled:
            self.rich.print(message)

    def warn(self, message: str) -> None:
        """Loud on the console, and kept in the log when stdout is a file (SLURM)."""
        if self.enabled:
            self.rich.print(f"[bold red]WARNING[/bold red] {message}", highlight=False)

    def start(self, num_images: int = 0, step: int = 0, elapsed_before_s: float = 0.0) -> None:
        """The bar, from where the run is (a resume starts it at its checkpoint, so that the
        speed and ETA are not skewed by the images trained before it)."""
        if not (self.enabled and self.tty):
            return
        # The text columns take about 76 characters: the bar gets what an 80-column terminal leaves.
        bar_width = max(4, min(40, self.rich.width - 76))
        self.progress = Progress(
            TextColumn("[bold]step {task.fields[step]}"), BarColumn(bar_width=bar_width),
            TextColumn("{task.fields[kimg]} kimg"), _SpeedColumn(),
            TextColumn("D {task.fields[loss_d]} G {task.fields[loss_g]} [dim]@{task.fields[log_step]}"),
            _ElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=self.rich, refresh_per_second=4,
        )
        self.progress.start()
        self._task = self.progress.add_task("train", total=self.total_images, completed=num_images, step=step,
                                            kimg=f"{num_images / 1000:.1f}", loss_d="-", loss_g="-", log_step="-",
                                            elapsed_before_s=elapsed_before_s)

    def advance(self, num_images: int, step: int) -> None:
        """Host integers only: the bar's step, kimg, speed, elapsed and ETA are live without a
        device read; the losses are the last log line's, and say of which step."""
        if self.progress is not None:
            self.progress.update(self._task, completed=num_images, step=step, kimg=f"{num_images / 1000:.1f}")

    def note(self, message: str) -> None:
        """An event worth a line of its own (a grid or a checkpoint written), on a terminal above
        the bar, in a log as a plain line. Not markup: a run name may hold brackets."""
        if self.enabled:
            self.rich.print(message, markup=False)

    def forget_records_after(self, step: int) -> None:
        """A resume or rollback to `step`: the records logged after it describe training that was
        undone, and a plot or reader of metrics.jsonl would mix two histories. They move to
        metrics.undone.jsonl (kept, not deleted) and metrics.jsonl is replaced whole."""
        if not self.enabled:
            return
        path = self.run_dir / "metrics.jsonl"
        self._metrics_file.close()
        kept, undone = [], []
        for line in path.read_text().splitlines():
            try:
                (undone if json.loads(line)["step"] > step else kept).append(line)
            except (json.JSONDecodeError, KeyError, TypeError):
                undone.append(line)  # a line cut short by a kill
        if undone:
            with open(self.run_dir / "metrics.undone.jsonl", "a") as dropped:
                dropped.write("".join(line + "\n" for line in undone))
            partial = path.with_name(".metrics.jsonl.partial")
            partial.write_text("".join(line + "\n" for line in kept))
            os.replace(partial, path)
        self._metrics_file = open(path, "a")  # noqa: SIM115

    def finish(self, lines: list[str]) -> None:
        """The closing block, printed after the bar has stopped (not over its last line)."""
        self._stop_bar()
        for line in lines:
            if self.enabled:
                self.rich.print(line, markup=False)

    def _record(self, record: dict) -> bool:
        """Trackers (every rank that has them) and metrics.jsonl; True where the console prints."""
        if self.accelerator is not None and self.accelerator.trackers:
            self.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
        if not self.enabled:
            return False
        self._metrics_file.write(json.dumps(record) + "\n")
        self._metrics_file.flush()
        return True

    def log(self, record: dict) -> None:
        """One record per log interval: metrics.jsonl, trackers, and the console."""
        if not self._record(record):
            return
        loss_d, loss_g = _fmt(record.get("Loss/D", float("nan"))), _fmt(record.get("Loss/G", float("nan")))
        if self.progress is not None:  # three digits: the bar must fit an 80-column terminal
            self.progress.update(self._task, loss_d=f"{record.get('Loss/D', float('nan')):.3g}",
                                 loss_g=f"{record.get('Loss/G', float('nan')):.3g}", log_step=record["step"])
        else:
            speed = f"{record['Speed/img_per_s']:.0f}"
            wait = record.get("Speed/data_wait_fraction", 0.0)
            self.rich.print(f"step {record['step']} kimg {record['kimg']:.1f} img/s {speed} "
                            f"Loss/D {loss_d} Loss/G {loss_g} data_wait {wait:.0%} "
                            f"elapsed {format_elapsed(record['time_s'])}"
                            + (f" ada_p {record['Augment/p']:.3f}" if "Augment/p" in record else ""))

    def log_eval(self, record: dict) -> None:
        """An evaluation's numbers: metrics.jsonl and trackers like a log record, and one line."""
        if not self._record(record):
            return
        numbers = ", ".join(f"{k[5:]} {_fmt(v)}" for k, v in record.items() if k.startswith("Eval/"))
        self.print(f"eval after step {record['step']} ({record['kimg']:.1f} kimg): {numbers}")

    def image(self, tag: str, grid_chw, step: int) -> None:
        if self.accelerator is not None and self.accelerator.trackers and self.enabled:
            tracker = self.accelerator.get_tracker("tensorboard", unwrap=True)
            tracker.add_image(tag, grid_chw, global_step=step)

    def _stop_bar(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def close(self) -> None:
        self._stop_bar()
        if self._metrics_file is not None:
            self._metrics_file.close()
            self._metrics_file = None
