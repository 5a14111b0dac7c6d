"""Real multi-process launches on CPU (gloo): torchrun and accelerate launch, 2 processes.

Each launch costs ~12 s of start-up here, so one launch per launcher covers every check:
world size 2 is seen, both ranks end with identical G and D, their first noise batches and
first data keys differ, and the result differs from a one-process run of the same config.
"""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from conftest import HELPERS, ROOT

pytestmark = pytest.mark.launch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(prefix: list[str], digits_dir, out_dir, *extra: str, timeout_s: int = 240) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "WORLD_SIZE", "RANK"))}
    env.update(PROBE_DIR=str(out_dir / "probe"), PYTHONPATH=f"{HELPERS}{os.pathsep}{ROOT}",
               OMP_NUM_THREADS="1")
    args = ["--config", str(ROOT / "configs" / "tiny.yaml"), f"data.path={digits_dir}",
            f"run.root={out_dir / 'runs'}", "plugins=[rank_probe]", "train.max_steps=12", "data.num_workers=1",
            *extra]
    return subprocess.run(prefix + [str(ROOT / "train.py"), *args], env=env, cwd=out_dir,
                          capture_output=True, text=True, timeout=timeout_s, check=False)


@pytest.fixture(scope="module")
def single_process(digits_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    result = _launch([sys.executable], digits_dir, out)
    assert result.returncode == 0, result.stderr
    return torch.load(out / "probe" / "rank0.pt")


LAUNCHERS = {
    "torchrun": lambda port: [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                              "--master_addr", "127.0.0.1", "--master_port", str(port)],
    "accelerate": lambda port: [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                                str(ROOT / "launch" / "accelerate" / "cpu-2proc.yaml"),
                                "--main_process_port", str(port)],
}


def _assert_identical_on_both_ranks(ranks: list[dict]) -> None:
    for net in ("G", "D"):
        for name, tensor in ranks[0][net].items():
            assert torch.equal(tensor, ranks[1][net][name]), f"{net}.{name} differs between ranks"


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_two_processes_are_really_distributed(launcher, digits_dir, tmp_path, single_process):
    result = _launch(LAUNCHERS[launcher](_free_port()), digits_dir, tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = [torch.load(tmp_path / "probe" / f"rank{r}.pt") for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert "2 processes on the CPU, data parallel over gloo" in result.stdout
    _assert_identical_on_both_ranks(ranks)
    assert not torch.equal(ranks[0]["first_noise"], ranks[1]["first_noise"]), "ranks drew the same noise"
    assert not set(ranks[0]["first_keys"]) & set(ranks[1]["first_keys"]), "ranks read the same samples"
    assert len(ranks[0]["first_keys"]) == 16  # batch 32 split over 2 ranks
    differs = any(not torch.equal(t, single_process["G"][k]) for k, t in ranks[0]["G"].items())
    assert differs, "2-process result equals the 1-process result: were the ranks really distributed?"


def test_two_ranks_with_two_workers_split_the_stream(digits_dir, tmp_path):
    """One launch: disjoint keys within an epoch, equal batch counts, repeatable per seed; and
    3 shards on 2 ranks x 4 workers read once (test_few_shards_on_many_slots_are_read_once)."""
    from gan_dist.data.prepare import write_shards
    from gan_dist.data.sources import digits

    # One entry per sample: every decode is one key (test_chunks.py bounds what chunks read).
    few = write_shards(digits(), tmp_path / "three-shards", shard_size=600, chunk=1)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "WORLD_SIZE", "RANK"))}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    launch = LAUNCHERS["torchrun"](_free_port())
    result = subprocess.run([*launch, str(HELPERS / "stream_probe.py"), str(digits_dir), str(tmp_path / "out"),
                             str(few)], env=env, capture_output=True, text=True, timeout=240, check=False)
    assert result.returncode == 0, result.stderr
    ranks = [json.loads((tmp_path / "out" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world_size"] == 2
    first = [r["first"] for r in ranks]
    assert not set(first[0]["keys"]) & set(first[1]["keys"])
    assert first[0]["batches"] == first[1]["batches"] > 0
    assert first[0]["min_batches"] == first[0]["max_batches"] == first[0]["batches"]
    for r in ranks:
        assert r["again"]["keys"] == r["first"]["keys"]
        assert r["other_seed"]["keys"] != r["first"]["keys"]
    _check_read_once(few, tmp_path / "out", [r["read_once"] for r in ranks])


def _check_read_once(dataset, out, ranks) -> None:
    """Per slot and epoch: the keys equal the planner's plan; in all: each key decoded once per
    epoch, and the tar bytes read at most 1.05x the dataset's."""
    from shards import keys_in

    from gan_dist.data.plan import plan_epoch

    info = json.loads((dataset / "index.json").read_text())
    assert len(info["shards"]) == 3
    keys_of = [keys_in(str(dataset / shard["name"])) for shard in info["shards"]]
    dataset_bytes = sum((dataset / s["name"]).stat().st_size for s in info["shards"])
    for epoch in (0, 1):
        plan = plan_epoch([s["count"] for s in info["shards"]], 0, epoch, 8)
        sizes = [sum(p.stop - p.start for p in pieces) for pieces in plan]
        assert max(sizes) - min(sizes) <= 1 and min(sizes) > 0
        for rank, batches in enumerate(ranks):
            for worker in range(4):
                got = [key for w, e, key, _ in batches if (w, e) == (worker, epoch)]
                want = [key for p in plan[rank * 4 + worker] for key in keys_of[p.shard][p.start:p.stop]]
                assert got == want, (rank, worker, epoch)
        read = sum(b for batches in ranks for _, e, _, b in batches if e == epoch)
        assert read <= 1.05 * dataset_bytes, (epoch, read, dataset_bytes)
    decoded = [int(k) for f in (out / "decoded").iterdir() for k in f.read_text().split()]
    assert sorted(decoded) == sorted([k for keys in keys_of for k in keys] * 2)  # 2 epochs


def _two_nodes(commands: list[list[str]], env: list[dict], cwd) -> list[subprocess.CompletedProcess]:
    """Start both 'nodes' at once (each waits for the other at the rendezvous); output goes to
    files (two pipes read one after the other can deadlock), and nothing outlives the test."""
    from contextlib import ExitStack

    with ExitStack() as stack:
        logs = [[stack.enter_context(open(cwd / f"node{i}.{kind}", "w+")) for kind in ("out", "err")]
                for i in range(len(commands))]
        procs = [subprocess.Popen(cmd, env=env[i], cwd=cwd, stdout=logs[i][0], stderr=logs[i][1], text=True)
                 for i, cmd in enumerate(commands)]
        try:
            for proc in procs:
                proc.wait(timeout=240)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        for out, err in logs:
            out.seek(0)
            err.seek(0)
        return [subprocess.CompletedProcess(p.args, p.returncode, out.read(), err.read())
                for p, (out, err) in zip(procs, logs, strict=True)]


@pytest.mark.parametrize("launcher", ["torchrun.sh", "accelerate"])
def test_two_nodes_on_one_machine_end_identical(launcher, digits_dir, tmp_path):
    port = _free_port()
    base = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "WORLD_SIZE", "RANK"))}
    base.update(PROBE_DIR=str(tmp_path / "probe"), PYTHONPATH=f"{HELPERS}{os.pathsep}{ROOT}", OMP_NUM_THREADS="1",
                PYTHON=sys.executable)
    args = ["--config", str(ROOT / "configs" / "tiny.yaml"), f"data.path={digits_dir}", f"run.root={tmp_path / 'runs'}",
            "plugins=[rank_probe]", "train.max_steps=20"]
    envs = [{**base, "NNODES": "2", "NODE_RANK": str(n), "NPROC_PER_NODE": "1", "MASTER_PORT": str(port)}
            for n in (0, 1)]
    if launcher == "torchrun.sh":
        commands = [["bash", str(ROOT / "launch" / "torchrun.sh"), *args] for _ in (0, 1)]
    else:
        commands = [[sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                     str(ROOT / "launch" / "accelerate" / "cpu-2proc.yaml"), "--num_machines", "2",
                     "--num_processes", "2", "--machine_rank", str(n), "--main_process_ip", "127.0.0.1",
                     "--main_process_port", str(port), str(ROOT / "train.py"), *args] for n in (0, 1)]
    results = _two_nodes(commands, envs, tmp_path)
    for result in results:
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    ranks = [torch.load(tmp_path / "probe" / f"rank{r}.pt") for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    _assert_identical_on_both_ranks(ranks)
    assert not set(ranks[0]["first_keys"]) & set(ranks[1]["first_keys"])


@pytest.mark.parametrize("target", ["one rank", "torchrun"])
def test_sigusr1_checkpoints_stops_and_marks_for_requeue(target, digits_dir, tmp_path, train_main):
    import signal
    import time

    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "WORLD_SIZE", "RANK"))}
    env.update(PROBE_DIR=str(tmp_path / "probe"), PYTHONPATH=f"{HELPERS}{os.pathsep}{ROOT}", OMP_NUM_THREADS="1",
               PYTHON=sys.executable, NPROC_PER_NODE="2")
    args = ["--config", str(ROOT / "configs" / "tiny.yaml"), f"data.path={digits_dir}", f"run.root={tmp_path / 'runs'}",
            "plugins=[pid_probe]", "train.total_kimg=100000", "log.every_steps=1000", "checkpoint.every_kimg=0",
            "log.sample_every_kimg=100000"]
    proc = subprocess.Popen(["bash", str(ROOT / "launch" / "torchrun.sh"), *args], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        pid_file = tmp_path / "probe" / "pid-rank1"
        for _ in range(600):
            if pid_file.is_file() or proc.poll() is not None:
                break
            time.sleep(0.1)
        assert pid_file.is_file(), proc.communicate()[0][-3000:]
        os.kill(int(pid_file.read_text()) if target == "one rank" else proc.pid, signal.SIGUSR1)
        output = proc.communicate(timeout=90)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    run_dir = tmp_path / "runs" / "tiny"
    assert (run_dir / "REQUEUE").is_file(), output[-3000:]
    stopped_at = json.loads((run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
                             / "state.json").read_text())["progress"]["step"]
    assert f"after step {stopped_at}: checkpoint" in output
    # The same command resumes (here in one process: the stream is re-derived, and says so).
    code, out, err = train_main(*args, f"train.max_steps={stopped_at + 3}")
    assert code == 0, err
    assert f"at step {stopped_at} " in out and "re-derived" in out
    assert (run_dir / "checkpoints" / f"step_{stopped_at + 3:08d}").is_dir() and not (run_dir / "REQUEUE").exists()
