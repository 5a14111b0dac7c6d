"""SIGKILL at named points of a run and a full disk at each checkpoint file (gan_dist/chaos.py):
the same command resumes, and the end equals the uninterrupted run's bit for bit. The kills:
one process, streamed through the chunked reader with 2 loader workers, ADA, lazy R1, sample
grids and periodic evaluation. The full disk: one process at each of rank 0's files, and 2
processes at rank 1's and rank 0's, with a rank killed between its files."""

import json
import os
import random
import re
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


RANK0_FILES = ("optimizers.pt", "rank0.pt", "rank0.json", "G.safetensors", "D.safetensors", "G_ema.safetensors",
               "model.json", "state.json", "latest")  # latest: its new version, written before the atomic replace


def _assert_gave_up_cleanly(run, err: str, renamed: bool = False) -> None:
    """`latest` still names step 10, no step-20 directory is left but the renamed one that
    `latest` never named (`renamed`), and each rank printed its one line with the sizes."""
    checkpoints = run / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step_00000010", "latest moved"
    assert not (checkpoints / "step_00000020.tmp").exists()
    assert (checkpoints / "step_00000020").exists() == renamed
    lines = [line for line in err.splitlines() if "no space left for checkpoint" in line]
    assert lines and f"{run.name}/checkpoints/step_00000020 (" in lines[0], err[-2000:]
    assert "it resumes from step_00000010" in lines[0], err[-2000:]
    needed = re.search(r"a checkpoint takes about ([\d.]+) (KiB|MiB) and .* has ([\d.]+) (KiB|MiB) free", lines[0])
    assert needed and float(needed.group(1)) > 0, lines[0]


@pytest.mark.parametrize("file_number", range(1, len(RANK0_FILES) + 1),
                         ids=lambda n: RANK0_FILES[n - 1])
def test_a_full_disk_at_a_checkpoint_file_stops_cleanly_and_resumes_exactly(train_main, digits_dir, tmp_path,
                                                                             monkeypatch, file_number):
    """Each file fails with the error its writer raises on a full disk: torch.save's names
    no cause (the free space decides), safetensors' names the OS error, the JSON files'
    are OSError(ENOSPC)."""
    from gan_dist import chaos

    legs = ("train.max_steps=10", "train.max_steps=20")
    assert train_main(*tiny_args(digits_dir, "run.name=full", legs[1]))[0] == 0
    assert train_main(*tiny_args(digits_dir, "run.name=split", legs[0]))[0] == 0
    monkeypatch.setattr(chaos, "_DISK_FULL", (0, file_number))
    monkeypatch.setattr(chaos, "_files_written", {})
    monkeypatch.setattr(chaos, "_disk_filled", False)
    code, _, err = train_main(*tiny_args(digits_dir, "run.name=split", legs[1]))
    assert code == 2 and "Traceback" not in err, err
    assert chaos._files_written[0] == file_number, "the disk filled elsewhere than at the named file"
    _assert_gave_up_cleanly(tmp_path / "runs" / "split", err, renamed=RANK0_FILES[file_number - 1] == "latest")
    monkeypatch.setattr(chaos, "_DISK_FULL", None)
    monkeypatch.setattr(chaos, "_disk_filled", False)
    code, out, err = train_main(*tiny_args(digits_dir, "run.name=split", legs[1]))
    assert code == 0 and "at step 10 " in out, err
    full, split = _final(tmp_path / "runs" / "full", 20), _final(tmp_path / "runs" / "split", 20)
    _assert_bitwise_equal(full[0], split[0], "weights")
    _assert_bitwise_equal(full[1], split[1], "optimizers")


def test_a_full_disk_before_the_first_checkpoint_names_the_command_that_starts_again(train_main, digits_dir,
                                                                                   monkeypatch):
    """No checkpoint to resume from: the line's advice, followed as written, trains the run."""
    from gan_dist import chaos

    monkeypatch.setattr(chaos, "_DISK_FULL", (0, 1))
    monkeypatch.setattr(chaos, "_files_written", {})
    monkeypatch.setattr(chaos, "_disk_filled", False)
    code, _, err = train_main(*tiny_args(digits_dir, "train.max_steps=10"))
    assert code == 2 and "add run.overwrite=true (there is no checkpoint yet" in err, err[-2000:]
    monkeypatch.setattr(chaos, "_DISK_FULL", None)
    monkeypatch.setattr(chaos, "_disk_filled", False)
    code, _, err = train_main(*tiny_args(digits_dir, "train.max_steps=10", "run.overwrite=true"))
    assert code == 0, err[-2000:]


@pytest.mark.parametrize("error, storage", [
    (RuntimeError("open file failed because of errno 13 on fopen: Permission denied, file path: x"), True),
    (TypeError("an argument of a bug of ours"), False)], ids=["torch.save refused", "a bug"])
def test_a_failed_save_that_is_no_full_disk_stops_cleanly_too(train_main, digits_dir, tmp_path, monkeypatch,
                                                              error, storage):
    """Storage that torch.save cannot use (its own error, no OSError) stops with the one line
    and exit 2; a bug of ours keeps its traceback. Either way the partial checkpoint is gone
    and `latest` still names step 10."""
    from gan_dist import resume

    assert train_main(*tiny_args(digits_dir, "train.max_steps=10"))[0] == 0
    save = resume.torch.save

    def failing(obj, path, *args, **kwargs):
        if "step_00000020" in str(path):
            raise error
        return save(obj, path, *args, **kwargs)

    monkeypatch.setattr(resume.torch, "save", failing)
    if storage:
        code, _, err = train_main(*tiny_args(digits_dir, "train.max_steps=20"))
        assert code == 2 and "Traceback" not in err, err[-3000:]
        assert "cannot write checkpoint " in err and "it resumes from step_00000010" in err, err[-3000:]
    else:
        with pytest.raises(TypeError, match="a bug of ours"):
            train_main(*tiny_args(digits_dir, "train.max_steps=20"))
    checkpoints = tmp_path / "runs" / "tiny" / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step_00000010"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step_00000010"]


def _pages(directory) -> int:
    """Bytes a tmpfs holds for the files under `directory` (whole 4 KiB pages each)."""
    return sum(-(-f.stat().st_size // 4096) * 4096 for f in directory.rglob("*") if f.is_file())


@pytest.fixture
def small_tmpfs(tmp_path):
    """A tmpfs of a given size, mounted on demand (needs root; skips where mounting is not allowed)."""
    mounted = []

    def mount(size_bytes: int):
        where = tmp_path / f"disk{len(mounted)}"
        where.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(where)],
                                capture_output=True, text=True, check=False)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip() or 'mount failed'})")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_real_full_disk_stops_cleanly_and_the_run_resumes_elsewhere(train_main, digits_dir, tmp_path, small_tmpfs):
    """No hook: run.root on a tmpfs that holds the run up to its step-10 checkpoint and half of
    another, so the real writers (torch.save, safetensors, JSON) meet the full disk wherever it
    comes. The run stops with its one line and exit 2, `latest` still names step 10, the
    partial checkpoint is gone; copied to a disk with room, the same command resumes to the
    uninterrupted run's end bit for bit."""
    import shutil

    legs = ("train.max_steps=10", "train.max_steps=20", "log.sample_every_kimg=1000")
    code, _, err = train_main(*tiny_args(digits_dir, f"run.root={tmp_path / 'probe'}", *legs[::2]))
    assert code == 0, err[-3000:]
    probe = tmp_path / "probe" / "tiny"
    size = _pages(probe) + _pages(probe / "checkpoints" / "step_00000010") // 2
    disk = small_tmpfs(size)
    assert train_main(*tiny_args(digits_dir, f"run.root={disk}", *legs[::2]))[0] == 0  # the probe again
    code, _, err = train_main(*tiny_args(digits_dir, f"run.root={disk}", *legs[1:]))
    assert code == 2 and "Traceback" not in err, err[-3000:]
    _assert_gave_up_cleanly(disk / "tiny", err)
    shutil.copytree(disk / "tiny", tmp_path / "roomy" / "tiny")
    code, out, err = train_main(*tiny_args(digits_dir, f"run.root={tmp_path / 'roomy'}", *legs[1:]))
    assert code == 0 and "at step 10 " in out, err[-3000:]
    assert train_main(*tiny_args(digits_dir, f"run.root={tmp_path / 'full'}", *legs[1:]))[0] == 0
    full, split = _final(tmp_path / "full" / "tiny", 20), _final(tmp_path / "roomy" / "tiny", 20)
    _assert_bitwise_equal(full[0], split[0], "weights")
    _assert_bitwise_equal(full[1], split[1], "optimizers")


def _launch_two(tmp_path, digits_dir, name: str, **chaos: str) -> subprocess.CompletedProcess:
    """A 2-process torchrun launch of 30 steps with checkpoints every 10; `chaos`: the
    GAN_DIST_* hook variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "WORLD_SIZE", "RANK"))}
    env.update(OMP_NUM_THREADS="1", **{f"GAN_DIST_{k}": v for k, v in chaos.items()})
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
               "127.0.0.1", "--master_port", str(_free_port()), str(ROOT / "train.py"),
               *tiny_args(digits_dir, f"run.root={tmp_path / 'runs'}", f"run.name={name}", "data.num_workers=0",
                          "train.max_steps=30", "checkpoint.every_kimg=0.32", "checkpoint.keep_last=0")]
    return subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240, check=False)


def test_two_ranks_stop_together_on_a_full_disk_and_on_a_killed_rank_and_resume_exactly(digits_dir, tmp_path):
    """One 2-process run, its legs failing in turn (6 launches where two tests took 8).
    A full disk at rank 1's step-20 files (rank1.pt, then rank1.json), then at rank 0's
    rank0.pt: both ranks stop with their line, exit code 2 (the healthy rank learns it
    from the vote), and the partial checkpoint is removed. Then rank 1 dies between its step-20
    files: torchrun stops the survivor, which commits nothing (committing needs both ranks).
    The same launch then resumes from step 10 to the uninterrupted run's end, bit for bit."""
    assert _launch_two(tmp_path, digits_dir, "full").returncode == 0
    run = tmp_path / "runs" / "split"
    # Files count from the leg's start: the first leg also writes step 10's two.
    for disk_full, full_rank in (("1:3", 1), ("1:2", 1), ("0:2", 0)):
        failed = _launch_two(tmp_path, digits_dir, "split", ENOSPC_AT=disk_full)
        assert failed.returncode != 0 and "exitcode  : 2" in failed.stderr, failed.stderr[-3000:]
        _assert_gave_up_cleanly(run, failed.stderr)
        # The first rank out exits 2, and torchrun SIGTERMs the other at once: that one may
        # die by the signal before it prints its own line (seen once in about 20 launches).
        lines = {full_rank: "(this rank: ", 1 - full_rank: "(another rank's disk is full)"}
        for rank, words in lines.items():
            printed = any(f"[rank {rank}/2]" in line and words in line for line in failed.stderr.splitlines())
            signalled = re.search(rf"rank +: {rank} \(local_rank: {rank}\)\n +exitcode +: -\d+", failed.stderr)
            assert printed or signalled, (rank, failed.stderr[-3000:])
    marker = tmp_path / "rank1.marker"
    killed = _launch_two(tmp_path, digits_dir, "split", KILL_AT="checkpoint_files:1", KILL_RANK="1",
                         KILL_MARKER=str(marker))
    assert killed.returncode != 0 and marker.read_text().split() == ["checkpoint_files", "1"], killed.stderr[-3000:]
    checkpoints = run / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step_00000010"
    assert not (checkpoints / "step_00000020").exists(), "a checkpoint was committed without rank 1"
    resumed = _launch_two(tmp_path, digits_dir, "split")
    assert resumed.returncode == 0 and "at step 10 " in resumed.stdout, resumed.stderr[-3000:]
    full, split = _final(tmp_path / "runs" / "full", 30), _final(run, 30)
    _assert_bitwise_equal(full[0], split[0], "weights")
    _assert_bitwise_equal(full[1], split[1], "optimizers")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
