"""SIGKILL at named points of a run (gan_dist/chaos.py): the same command resumes, and the
end equals the uninterrupted run's bit for bit. One process, streamed through the chunked
reader with 2 loader workers, ADA, lazy R1, sample grids and periodic evaluation."""

import json
import os
import random
import subprocess
import sys

import pytest
from conftest import ROOT, tiny_args
from test_resume import ADA, _assert_bitwise_equal, _final

TOTAL_STEPS = 40  # batches of 32: checkpoints and grids every 10 steps, evaluations every 20
FLAGS = ("train.total_kimg=1.28", "data.num_workers=2", "data.resident=off", "checkpoint.every_kimg=0.32",
         "checkpoint.keep_last=0", "log.every_steps=5", "log.sample_every_kimg=0.32", "loss.r1_gamma=1",
         "loss.r1_interval=3", "eval.every_kimg=0.64", "eval.metrics=[cls]", "eval.num=64", "plugins=[fast_cls]",
         *ADA)
# (point, arrival): mid-D-step in step 25; the second checkpoint (step 20) between its files,
# and after its rename before `latest` moves; the step-20 grid (grid 0 is the untrained G's);
# the first evaluation (step 20); and the start of a step drawn by a seeded generator.
KILLS = [("d_step", 25), ("checkpoint_files", 2), ("checkpoint_committed", 2), ("sample_grid", 3), ("eval", 1),
         ("step", random.Random(27).randint(12, TOTAL_STEPS - 2))]


def _train(tmp_path, digits_dir, name, kill=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests" / "helpers"), "OMP_NUM_THREADS": "1"}
    if kill:
        env.update(GAN_DIST_KILL_AT=f"{kill[0]}:{kill[1]}", GAN_DIST_KILL_MARKER=str(tmp_path / f"{name}.marker"))
    args = tiny_args(digits_dir, *FLAGS, f"run.name={name}", f"run.root={tmp_path / 'runs'}",
                     f"eval.cache_dir={tmp_path.parent / 'chaos-cache'}")
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300, check=False)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, digits_dir):
    tmp_path = tmp_path_factory.mktemp("chaos")
    done = _train(tmp_path, digits_dir, "full")
    assert done.returncode == 0, done.stderr[-3000:]
    return _final(tmp_path / "runs" / "full", TOTAL_STEPS)


@pytest.mark.parametrize("kill", KILLS, ids=[f"{point}-{arrival}" for point, arrival in KILLS])
def test_a_run_killed_at_any_point_resumes_to_the_same_end(uninterrupted, tmp_path, digits_dir, kill):
    killed = _train(tmp_path, digits_dir, "run", kill)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert (tmp_path / "run.marker").read_text().split() == [kill[0], str(kill[1])], "died before the point"
    resumed = _train(tmp_path, digits_dir, "run")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    weights, optimizers, state = _final(tmp_path / "runs" / "run", TOTAL_STEPS)
    _assert_bitwise_equal(uninterrupted[0], weights, "weights")
    _assert_bitwise_equal(uninterrupted[1], optimizers, "optimizers")
    assert state["ada"] == uninterrupted[2]["ada"] and state["progress"] == uninterrupted[2]["progress"]
    evals = [json.loads(line)["step"] for line in (tmp_path / "runs" / "run" / "metrics.jsonl").read_text().splitlines()
             if "Eval/cls_fd" in line]
    assert evals == [20, 40], evals
