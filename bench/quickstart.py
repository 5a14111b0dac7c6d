"""The quickstart's figures, measured: the one place the README's quickstart numbers come from.

Trains configs/default.yaml as launch/quickstart.sh does (after setup: the digits prepared,
the config as shipped), times it, runs bench/digits_quality.py on the result, and writes
bench/results/quickstart.json. With --readme it also rewrites the README's quickstart block
from that file; tests/test_docs.py checks that the README's block is what the file says.

    python bench/quickstart.py [--runs 2] [--readme]
    python bench/quickstart.py --readme-only     # re-render the block from the results file
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "quickstart.json"
README = ROOT / "README.md"
BLOCK_START = "<!-- quickstart-results: written by bench/quickstart.py from bench/results/quickstart.json -->"
BLOCK_END = "<!-- /quickstart-results -->"
RUN_NAME = "quickstart-bench"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _commit() -> str:
    """HEAD, marked when the measured tree had changes not yet committed."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()

    return (git("rev-parse", "--short", "HEAD") or "unknown") + ("-dirty" if git("status", "--porcelain", "-uno") else "")


def measure_once(python: str) -> dict:
    """One quickstart training and verdict: wall time, training time, final speed, figures."""
    started = time.perf_counter()
    subprocess.run([python, "train.py", "--config", "configs/default.yaml", f"run.name={RUN_NAME}",
                    "run.overwrite=true"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    wall_s = time.perf_counter() - started
    run_dir = ROOT / "runs" / RUN_NAME
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    figures_path = run_dir / "digits_quality.json"
    subprocess.run([python, "bench/digits_quality.py", "--run", str(run_dir), "--json", str(figures_path)],
                   cwd=ROOT, check=False, stdout=subprocess.DEVNULL)
    return {"wall_s": round(wall_s, 1), "train_s": round(records[-1]["time_s"], 1),
            "img_per_s_last": round(records[-1]["Speed/img_per_s"]), **json.loads(figures_path.read_text())}


def readme_block(results: dict) -> str:
    """The README's quickstart figures, rendered from the results file alone."""
    runs = results["runs"]
    seconds = ", ".join(f"{r['train_s']:.0f} s" for r in runs)
    walls = ", ".join(f"{r['wall_s']:.0f} s" for r in runs)
    rows = "\n".join(f"| {i + 1} | {r['confident']:.1%} | {r['smallest_class']:.1%}-{r['largest_class']:.1%} | "
                     f"{r['diversity']:.2f} | {'yes' if r['verdict'] else 'NO'} |" for i, r in enumerate(runs))
    return (f"{BLOCK_START}\n"
            f"Measured on {results['date']} at commit {results['commit']} ({results['machine']}), "
            f"`python bench/quickstart.py`: training took {seconds} ({walls} with start-up, "
            f"{runs[-1]['img_per_s_last']:,} img/s at the end); held-out real digits score "
            f"{runs[0]['held_out_confident']:.1%} confident.\n\n"
            "| run | confident (of 4,096) | classes | diversity | verdict |\n|---|---|---|---|---|\n"
            f"{rows}\n{BLOCK_END}")


def rewrite_readme(results: dict) -> None:
    text = README.read_text()
    start, end = text.index(BLOCK_START), text.index(BLOCK_END) + len(BLOCK_END)
    README.write_text(text[:start] + readme_block(results) + text[end:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2, help="quickstart runs (the same config each time)")
    parser.add_argument("--readme", action="store_true", help="rewrite the README's block afterwards")
    parser.add_argument("--readme-only", action="store_true", help="only re-render the block from the file")
    args = parser.parse_args()
    if not args.readme_only:
        if not (ROOT / "data" / "digits" / "index.json").is_file():
            subprocess.run([sys.executable, "-m", "gan_dist.cli", "prepare", "digits", "--out", "data/digits"],
                           cwd=ROOT, check=True)
        runs = [measure_once(sys.executable) for _ in range(args.runs)]
        results = {"date": datetime.date.today().isoformat(), "commit": _commit(),
                   "machine": f"{os.cpu_count()} cores, {_cpu_model()}", "runs": runs}
        RESULTS.write_text(json.dumps(results, indent=1) + "\n")
        print(json.dumps(results, indent=1))
    if args.readme or args.readme_only:
        rewrite_readme(json.loads(RESULTS.read_text()))
        print(f"rewrote the quickstart block of {README}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
