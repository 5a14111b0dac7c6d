"""`gan-dist plot --run DIR [--out PNG]`: a run's metrics.jsonl as one figure against kimg.

One panel per family of series that the run logged (losses, D's logits, gradient norms,
speed, data, skipped steps, augmentation, schedules, evaluation), one line per key. A resume
moves the records a killed leg logged past its checkpoint to metrics.undone.jsonl; a file
from before that rule may still hold them, and a record whose step is not above the last one
kept then replaces those at or after its step.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from gan_dist.errors import UserError

# (panel title, which keys it draws); the first family that claims a key draws it.
PANELS = (
    ("losses", lambda key: key.startswith("Loss/")),
    ("D logits (mean)", lambda key: key.startswith("Logits/")),
    ("gradient norms", lambda key: key.startswith("GradNorm/")),
    ("img/s", lambda key: key == "Speed/img_per_s"),
    ("data (wait fraction, failures, bad samples, MiB read)",
     lambda key: key.startswith("Data/") or key == "Speed/data_wait_fraction"),
    ("skipped steps (total)", lambda key: key.startswith("Skipped/") or key == "Rollbacks"),
    ("augmentation", lambda key: key.startswith("Augment/")),
    ("schedules", lambda key: key.startswith("Schedule/")),
    ("evaluation", lambda key: key.startswith("Eval/")),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, type=Path, help="run directory (holds metrics.jsonl)")
    parser.add_argument("--out", type=Path, default=None, help="PNG to write (default: RUN/plot.png)")


def read_records(metrics_path: Path) -> list[dict]:
    """metrics.jsonl's records in training order; a record whose step is not above the last
    one kept replaces those at or after its step. Training and evaluation records are two
    streams (an evaluation repeats its step's number)."""
    kept: dict[bool, list[dict]] = {False: [], True: []}
    lines = metrics_path.read_text().splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                continue  # a last line cut short by a kill: the run goes on without it
            raise UserError(f"{metrics_path} line {number} is not JSON; remove that line and plot again") from None
        stream = kept[_is_eval(record)]
        while stream and stream[-1]["step"] >= record["step"]:
            stream.pop()
        stream.append(record)
    return sorted(kept[False] + kept[True], key=lambda record: (record["step"], _is_eval(record)))


def _is_eval(record: dict) -> bool:
    return any(key.startswith("Eval/") for key in record)


def panel_series(records: list[dict]) -> list[tuple[str, dict[str, tuple[list[float], list[float]]]]]:
    """[(panel title, {key: (kimg values, values)})], for the panels with at least one key."""
    panels = []
    for title, claims in PANELS:
        keys = sorted({key for record in records for key in record if claims(key)})
        series = {key: ([r["kimg"] for r in records if key in r], [r[key] for r in records if key in r])
                  for key in keys}
        if series:
            panels.append((title, series))
    return panels


def plot_run(run_dir: Path, out_path: Path | None = None):
    """Write the figure; returns (path, matplotlib Figure) so that tests can read its panels."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a cluster node
    import matplotlib.pyplot as plt

    metrics_path = run_dir / "metrics.jsonl"
    if not metrics_path.is_file():
        raise UserError(f"{metrics_path} does not exist: pass --run with a run directory (runs/NAME) that has logged")
    records = read_records(metrics_path)
    panels = panel_series(records)
    if not panels:
        raise UserError(f"{metrics_path} holds no records yet: the first comes after log.every_steps steps")
    columns = 2 if len(panels) > 1 else 1
    rows = -(-len(panels) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(6.5 * columns, 3.2 * rows), squeeze=False)
    for ax, (title, series) in zip(axes.flat, panels):
        for key, (kimg, values) in series.items():
            ax.plot(kimg, values, label=key, marker="o" if len(values) < 20 else None, markersize=3)
        ax.set_title(title)
        ax.set_xlabel("kimg")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    for ax in list(axes.flat)[len(panels):]:
        figure.delaxes(ax)
    figure.suptitle(f"{run_dir.name}: {len(records)} records, up to step {records[-1]['step']}")
    figure.tight_layout()
    out_path = out_path or run_dir / "plot.png"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_path, dpi=100)
    return out_path, figure


def run(args) -> int:
    import matplotlib.pyplot as plt

    path, figure = plot_run(args.run, args.out)
    plt.close(figure)
    print(f"wrote {path}")
    return 0
