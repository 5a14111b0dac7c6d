"""What a run tells the world: rich progress on rank 0, plain lines when stdout is not a
terminal (SLURM logs), metrics.jsonl, TensorBoard through accelerate's trackers, grids.

Only rank 0 prints or writes; other ranks get a console whose methods do nothing.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from rich.console import Console as RichConsole
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table


def _fmt(value: float) -> str:
    return f"{value:.4g}"


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

    def start(self) -> None:
        if not (self.enabled and self.tty):
            return
        self.progress = Progress(
            TextColumn("[bold]step {task.fields[step]}"), BarColumn(),
            TextColumn("{task.fields[kimg]} kimg"), TextColumn("{task.fields[speed]} img/s"),
            TextColumn("D {task.fields[loss_d]}  G {task.fields[loss_g]}"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=self.rich, refresh_per_second=4,
        )
        self.progress.start()
        self._task = self.progress.add_task("train", total=self.total_images, step=0, kimg="0.0",
                                            speed="-", loss_d="-", loss_g="-")

    def advance(self, num_images: int, step: int) -> None:
        if self.progress is not None:
            self.progress.update(self._task, completed=num_images, step=step)

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
        speed = f"{record['Speed/img_per_s']:.0f}"
        if self.progress is not None:
            self.progress.update(self._task, kimg=f"{record['kimg']:.1f}", speed=speed,
                                 loss_d=loss_d, loss_g=loss_g)
        else:
            wait = record.get("Speed/data_wait_fraction", 0.0)
            self.rich.print(f"step {record['step']} kimg {record['kimg']:.1f} img/s {speed} "
                            f"Loss/D {loss_d} Loss/G {loss_g} data_wait {wait:.0%} "
                            f"elapsed {time.strftime('%H:%M:%S', time.gmtime(record['time_s']))}"
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

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        if self._metrics_file is not None:
            self._metrics_file.close()
            self._metrics_file = None
