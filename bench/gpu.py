"""The GPU check in one prepared run: correctness first, speed last. Run it through
bench/gpu.sh, which installs carried wheels on a bare machine, tees everything to OUT/log
and keeps the whole run within 4 minutes.

    python bench/gpu.py [--dry-run] [--out DIR] [--budget-s 215]

One process per precision (bench/gpu_checks.py: fp16, then fp32, then bf16 with the compile
rows last), each given what is left of the budget; their rows print as each check ends and
go to OUT/gpu.md, rewritten after every row so that a timeout keeps what ran. Exit 1 when a
check or a process failed. --dry-run runs the same checks on the CPU at toy sizes (the test
suite does), to know the script is ready before a GPU is borrowed.
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
CHECKS_HEADER = ["| check | setting | result | detail |", "|---|---|---|---|"]
SPEED_HEADER = ["| model | variant | img/s | peak GiB | TFLOP/s | graphs | recompiles |", "|---|---|---|---|---|---|---|"]
PRECISIONS = ("fp16", "no", "bf16")


def versions() -> str:
    import accelerate

    device = "CPU (dry run)" if not torch.cuda.is_available() else torch.cuda.get_device_name()
    return (f"{device}; Python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
            f"accelerate {accelerate.__version__}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")


class Tables:
    def __init__(self, out: Path, title: str):
        self.path, self.title = out / "gpu.md", title
        self.rows = {"checks": [], "speed": []}
        self.write()

    def add(self, line: str) -> bool:
        """A `ROW table | cells` line from a check process; True when it reports a failure."""
        table, _, cells = line[4:].partition(" | ")
        self.rows[table].append(f"| {cells} |")
        self.write()
        return "FAILED" in cells

    def write(self) -> None:
        lines = [self.title, "", *CHECKS_HEADER, *self.rows["checks"], "", *SPEED_HEADER, *self.rows["speed"], ""]
        self.path.write_text("\n".join(lines))


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_precision(precision: str, args, tables: Tables, deadline: float) -> bool:
    """One check process, its output passed through as it comes; True when all went well.
    A timer kills it at the deadline (a cold compile can take that long without a word)."""
    command = [sys.executable, str(HERE / "gpu_checks.py"), precision, *(["--dry-run"] if args.dry_run else [])]
    start, ok = time.monotonic(), True
    # Its own process group: at the deadline its loader and compile workers go with it (they
    # hold the output pipe open, and a kill of the process alone would leave them running).
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                          start_new_session=True) as proc:
        timer = threading.Timer(max(1.0, deadline - start), lambda: _kill_group(proc))
        timer.start()
        try:
            for line in proc.stdout:
                print(line, end="", flush=True)
                if line.startswith("ROW "):
                    ok &= not tables.add(line.rstrip("\n"))
            proc.wait()
        finally:
            timer.cancel()
    seconds = time.monotonic() - start
    print(f"[{precision} process: {seconds:.0f} s, exit code {proc.returncode}]", flush=True)
    if proc.returncode and time.monotonic() >= deadline - 1:
        tables.add(f"ROW checks | {precision} process | | FAILED: stopped at the budget after {seconds:.0f} s; "
                   "the rows above are what finished |")
        return False
    if proc.returncode:
        tables.add(f"ROW checks | {precision} process | | FAILED: exit code {proc.returncode} (see the log) |")
        return False
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "gpu")
    parser.add_argument("--budget-s", type=float, default=215.0, help="for all processes together")
    args = parser.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("bench/gpu.py: no CUDA GPU visible; use --dry-run to check the script on a CPU")
    args.out.mkdir(parents=True, exist_ok=True)
    title = f"bench/gpu.sh{' --dry-run' if args.dry_run else ''}: {versions()}"
    print(title, flush=True)
    tables = Tables(args.out, title)
    deadline = time.monotonic() + args.budget_s
    ok = True
    for precision in PRECISIONS:
        if time.monotonic() > deadline:
            tables.add(f"ROW checks | {precision} process | | FAILED: not started, the budget was spent |")
            ok = False
            continue
        ok &= run_precision(precision, args, tables, deadline)
    print("\n" + tables.path.read_text(), flush=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
