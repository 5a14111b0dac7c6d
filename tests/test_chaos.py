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
# One run killed six times, each leg resumed by the same command and killed at the next
# point: (point, arrival counted from the leg's start, the step `latest` names afterwards).
# Grids, evaluations and checkpoints come every 10/20/10 steps, in that order within a step.
KILLS = [("sample_grid", 3, 10),  # the step-20 grid (grid 0 is the untrained G's)
         ("eval", 1, 10),  # the step-20 evaluation, before that step's checkpoint
         ("checkpoint_files", 1, 10),  # between the step-20 checkpoint's files
         ("checkpoint_committed", 1, 10),  # step_00000020 renamed into place, `latest` not moved
         ("d_step", 15, 20),  # mid-D-step in step 25 (the leg starts after step 10)
         ("step", random.Random(27).randint(2, TOTAL_STEPS - 22), None)]  # a seeded moment after step 20


def _train(tmp_path, digits_dir, name, kill=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests" / "helpers"), "OMP_NUM_THREADS": "1"}
    if kill:
        env.update(GAN_DIST_KILL_AT=f"{kill[0]}:{kill[1]}", GAN_DIST_KILL_MARKER=str(tmp_path / f"{name}.marker"))
    args = tiny_args(digits_dir, *FLAGS, f"run.name={name}", f"run.root={tmp_path / 'runs'}",
                     f"eval.cache_dir={tmp_path / 'cache'}")
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300, check=False)


def test_a_run_killed_at_six_points_resumes_to_the_same_end(tmp_path, digits_dir):
    full = _train(tmp_path, digits_dir, "full")
    assert full.returncode == 0, full.stderr[-3000:]
    latest = tmp_path / "runs" / "run" / "checkpoints" / "latest"
    for point, arrival, latest_step in KILLS:
        killed = _train(tmp_path, digits_dir, "run", (point, arrival))
        assert killed.returncode == -9, (point, killed.stderr[-3000:])
        assert (tmp_path / "run.marker").read_text().split() == [point, str(arrival)], f"died before {point}"
        if latest_step is not None:
            assert latest.read_text().strip() == f"step_{latest_step:08d}", point
    resumed = _train(tmp_path, digits_dir, "run")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected = _final(tmp_path / "runs" / "full", TOTAL_STEPS)
    weights, optimizers, state = _final(tmp_path / "runs" / "run", TOTAL_STEPS)
    _assert_bitwise_equal(expected[0], weights, "weights")
    _assert_bitwise_equal(expected[1], optimizers, "optimizers")
    assert state["ada"] == expected[2]["ada"] and state["progress"] == expected[2]["progress"]
    evals = [json.loads(line)["step"] for line in (tmp_path / "runs" / "run" / "metrics.jsonl").read_text().splitlines()
             if "Eval/cls_fd" in line]
    assert evals == [20, 40], evals


RANK0_FILES = ("rank0.pt", "rank0.json", "optimizers.pt", "G.safetensors", "D.safetensors", "G_ema.safetensors",
               "state.json")


def _assert_gave_up_cleanly(run, err: str) -> None:
    checkpoints = run / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step_00000010", "latest moved"
    assert not (checkpoints / "step_00000020.tmp").exists() and not (checkpoints / "step_00000020").exists()
    lines = [line for line in err.splitlines() if "no space left for checkpoint" in line]
    assert lines and f"{run.name}/checkpoints/step_00000020 (" in lines[0], err[-2000:]
    assert " MiB and " in lines[0] and "it resumes from step_00000010" in lines[0]


@pytest.mark.parametrize("file_number", range(1, len(RANK0_FILES) + 1),
                         ids=lambda n: RANK0_FILES[n - 1])
def test_a_full_disk_at_a_checkpoint_file_stops_cleanly_and_resumes_exactly(train_main, digits_dir, tmp_path,
                                                                             monkeypatch, file_number):
    from gan_dist import chaos

    legs = ("train.max_steps=10", "train.max_steps=20")
    assert train_main(*tiny_args(digits_dir, "run.name=full", legs[1]))[0] == 0
    assert train_main(*tiny_args(digits_dir, "run.name=split", legs[0]))[0] == 0
    monkeypatch.setattr(chaos, "_DISK_FULL", (0, file_number))
    monkeypatch.setattr(chaos, "_files_written", {})
    code, _, err = train_main(*tiny_args(digits_dir, "run.name=split", legs[1]))
    assert code == 2, err
    assert chaos._files_written[0] == file_number, "the disk filled elsewhere than at the named file"
    _assert_gave_up_cleanly(tmp_path / "runs" / "split", err)
    monkeypatch.setattr(chaos, "_DISK_FULL", None)
    code, out, err = train_main(*tiny_args(digits_dir, "run.name=split", legs[1]))
    assert code == 0 and "at step 10 " in out, err
    full, split = _final(tmp_path / "runs" / "full", 20), _final(tmp_path / "runs" / "split", 20)
    _assert_bitwise_equal(full[0], split[0], "weights")
    _assert_bitwise_equal(full[1], split[1], "optimizers")


def test_a_full_disk_on_rank_1_stops_both_ranks(digits_dir, tmp_path):
    """Rank 1's disk fills at each of its checkpoint files in turn: both ranks stop with their
    line (rank 0 learns it from the vote), the partial checkpoint is removed, and the same
    launch then resumes to the uninterrupted 2-process run's end bit for bit."""
    def launch(*extra, disk_full=""):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "WORLD_SIZE", "RANK"))}
        env.update(OMP_NUM_THREADS="1", GAN_DIST_ENOSPC_AT=disk_full)
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                   "127.0.0.1", "--master_port", str(_free_port()), str(ROOT / "train.py"),
                   *tiny_args(digits_dir, f"run.root={tmp_path / 'runs'}", "data.num_workers=0", *extra)]
        return subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240, check=False)

    assert launch("run.name=full", "train.max_steps=20").returncode == 0
    assert launch("train.max_steps=10").returncode == 0
    for file_number in (1, 2):  # rank1.pt, rank1.json
        failed = launch("train.max_steps=20", disk_full=f"1:{file_number}")
        assert failed.returncode != 0
        _assert_gave_up_cleanly(tmp_path / "runs" / "tiny", failed.stderr)
        assert "[rank 0/2]" in failed.stderr and "another rank's disk is full" in failed.stderr, failed.stderr[-3000:]
        assert "[rank 1/2]" in failed.stderr and "No space left on device" in failed.stderr
    resumed = launch("train.max_steps=20")
    assert resumed.returncode == 0 and "at step 10 " in resumed.stdout, resumed.stderr[-3000:]
    full, split = _final(tmp_path / "runs" / "full", 20), _final(tmp_path / "runs" / "tiny", 20)
    _assert_bitwise_equal(full[0], split[0], "weights")
    _assert_bitwise_equal(full[1], split[1], "optimizers")


def test_one_rank_killed_the_other_stops_and_the_resume_is_exact(digits_dir, tmp_path):
    """Rank 1 dies mid-D-step of step 25 (checkpoints every 10 steps): torchrun stops the
    survivor, which commits nothing more (no half checkpoint: committing needs both ranks), and
    the same launch resumes from step 20 to the uninterrupted 2-process run's end."""
    def launch(name, kill=False):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "WORLD_SIZE", "RANK"))}
        env.update(OMP_NUM_THREADS="1")
        if kill:
            env.update(GAN_DIST_KILL_AT="d_step:25", GAN_DIST_KILL_RANK="1",
                       GAN_DIST_KILL_MARKER=str(tmp_path / "rank1.marker"))
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                   "127.0.0.1", "--master_port", str(_free_port()), str(ROOT / "train.py"),
                   *tiny_args(digits_dir, f"run.root={tmp_path / 'runs'}", f"run.name={name}", "data.num_workers=0",
                              "train.max_steps=30", "checkpoint.every_kimg=0.32", "checkpoint.keep_last=0")]
        return subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240, check=False)

    assert launch("full").returncode == 0
    killed = launch("split", kill=True)
    assert killed.returncode != 0 and (tmp_path / "rank1.marker").read_text().split() == ["d_step", "25"]
    checkpoints = tmp_path / "runs" / "split" / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step_00000020"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step_00000010", "step_00000020"]
    resumed = launch("split")
    assert resumed.returncode == 0 and "at step 20 " in resumed.stdout, resumed.stderr[-3000:]
    full, split = _final(tmp_path / "runs" / "full", 30), _final(checkpoints.parent, 30)
    _assert_bitwise_equal(full[0], split[0], "weights")
    _assert_bitwise_equal(full[1], split[1], "optimizers")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
