"""slurm/train.sh on a real one-node SLURM cluster that the tests start (slurm/local_cluster.sh).

CI installs SLURM (.ci/run), so there a missing SLURM fails these tests; elsewhere they skip
with the reason. The node declares two fake GPUs, so `--gpus-per-node=2` is exercised too.
"""

import json
import os
import subprocess
import sys
import time

import pytest
from conftest import ROOT

pytestmark = pytest.mark.launch
# Long enough that a signal sent after the first checkpoint (step 32) lands mid-run.
LONG_STEPS = 300
LONG_RUN = [f"train.max_steps={LONG_STEPS}", "train.total_kimg=1000", "checkpoint.every_kimg=1", "log.every_steps=1",
            "log.sample_every_kimg=1000"]

CLUSTER = ROOT / "slurm" / "local_cluster.sh"
TRAIN_SH = ROOT / "slurm" / "train.sh"
NOT_INSTALLABLE = 3  # local_cluster.sh's exit code when SLURM is missing and cannot be installed


@pytest.fixture(scope="module")
def slurm_env(tmp_path_factory):
    """Environment for sbatch & co. pointing at a fresh local cluster, stopped afterwards."""
    state = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "LOCAL_SLURM_DIR": str(state)}
    started = subprocess.run(["bash", str(CLUSTER), "start", "--gpus", "2", "--no-install"], env=env,
                             capture_output=True, text=True, timeout=120, check=False)
    if started.returncode == NOT_INSTALLABLE and os.environ.get("CI") != "true":
        pytest.skip(f"no SLURM here ({started.stderr.strip()}); `sudo bash slurm/local_cluster.sh install` adds it")
    assert started.returncode == 0, started.stdout + started.stderr
    env["SLURM_CONF"] = str(state / "slurm.conf")
    yield env
    subprocess.run(["bash", str(CLUSTER), "stop"], env=env, capture_output=True, timeout=60, check=False)


def _train_args(digits_dir, run_root, *extra: str) -> list[str]:
    return [str(ROOT / "configs" / "tiny.yaml"), f"data.path={digits_dir}", f"run.root={run_root}", *extra]


def _submit(slurm_env, tmp_path, sbatch_options: list[str], args: list[str], wait: bool = True,
            **job_env: str) -> subprocess.Popen:
    """sbatch the training script; the job's environment is ours plus job_env."""
    env = {**slurm_env, "GAN_DIST_ROOT": str(ROOT), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **job_env}
    command = ["sbatch", "--parsable", "--cpus-per-task=2", f"--chdir={tmp_path}", f"--output={tmp_path / 'job.log'}",
               *(["--wait"] if wait else []), *sbatch_options, str(TRAIN_SH), *args]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen, tmp_path, timeout_s: int = 300) -> tuple[int, str]:
    try:
        proc.communicate(timeout=timeout_s)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = tmp_path / "job.log"
    return proc.returncode, log.read_text() if log.is_file() else "(no job log)"


def test_scripts_parse():
    """Needs no SLURM, so it runs everywhere."""
    for script in ("slurm/train.sh", "slurm/node.sh", "slurm/local_cluster.sh", "launch/torchrun.sh", "launch/lib.sh"):
        assert subprocess.run(["bash", "-n", str(ROOT / script)], check=False).returncode == 0, script


def test_job_logs_in_the_project_root_are_ignored_by_git():
    """Needs no SLURM. train.sh's log goes where the job is submitted from, the project root, by
    the #SBATCH defaults (a job name other than gan_dist, or sbatch's own slurm-<id>.out, too)."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    assert "#SBATCH --job-name=gan_dist\n" in TRAIN_SH.read_text()
    assert "#SBATCH --output=%x-%j.out\n" in TRAIN_SH.read_text()
    logs = ["gan_dist-123.out", "big_run-4567.out", "slurm-89.out"]
    result = subprocess.run(["git", "check-ignore", *logs], cwd=ROOT, capture_output=True, text=True, timeout=30,
                            check=False)
    assert result.stdout.split() == logs, result.stdout + result.stderr


@pytest.mark.parametrize("sbatch_options", [[], ["--cpus-per-task=2"], ["--cpus-per-task=2", "--nodes=2"]],
                         ids=["script defaults", "8 GPUs", "2 nodes"])
def test_a_job_the_cluster_can_never_run_is_refused_at_submission(slurm_env, tmp_path, sbatch_options):
    """train.sh's defaults (8 GPUs, 32 CPUs) on the 2-GPU node: sbatch says why and exits, instead of
    queueing a job that waits forever with reason PartitionConfig (EnforcePartLimits=ALL)."""
    command = ["sbatch", "--parsable", f"--chdir={tmp_path}", f"--output={tmp_path / 'job.log'}", *sbatch_options,
               str(TRAIN_SH), str(ROOT / "configs" / "tiny.yaml")]
    result = subprocess.run(command, env={**slurm_env, "GAN_DIST_ROOT": str(ROOT)}, capture_output=True, text=True,
                            timeout=60, check=False)
    if result.returncode == 0:  # queued: never leave it pending for the next tests
        subprocess.run(["scancel", result.stdout.strip()], env=slurm_env, timeout=30, check=False)
    assert result.returncode != 0, f"queued instead of refused: {result.stdout}"
    assert "Batch job submission failed:" in result.stderr, result.stderr
    # Which limit is named first depends on the machine's CPU count: either says what is missing.
    assert ("More processors requested than permitted" in result.stderr
            or "Requested node configuration is not available" in result.stderr), result.stderr


def test_stop_removes_what_start_made_and_nothing_else(slurm_env, tmp_path):
    """A cluster of its own (the module's keeps running): stop leaves no directory behind; a
    directory that start did not make is not touched, nor a file someone else put in ours."""
    def cluster(directory, *command: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(CLUSTER), *command], env={**slurm_env, "LOCAL_SLURM_DIR": str(directory)},
                              capture_output=True, text=True, timeout=120, check=False)

    ours = tmp_path / "cluster"
    for foreign in ("", "job.log"):
        started = cluster(ours, "start", "--no-install")
        assert started.returncode == 0, started.stdout + started.stderr
        if foreign:
            (ours / foreign).write_text("not the cluster's")
        stopped = cluster(ours, "stop")
        assert stopped.returncode == 0 and "stopped slurmd slurmctld munged" in stopped.stdout, stopped.stdout
        if foreign:
            # The stamp stays with a kept directory, so that start takes it again.
            assert sorted(p.name for p in ours.iterdir()) == [".gan_dist_local_cluster", foreign], stopped.stdout
            again = cluster(ours, "start", "--no-install")
            assert again.returncode == 0, again.stdout + again.stderr
            assert cluster(ours, "stop").returncode == 0 and (ours / foreign).is_file()
        else:
            assert not ours.exists() and f"removed {ours}" in stopped.stdout, stopped.stdout
    other = tmp_path / "other"
    (other / "state").mkdir(parents=True)
    (other / "slurm.conf").write_text("someone else's")
    assert cluster(other, "stop").returncode == 0
    assert sorted(p.name for p in other.iterdir()) == ["slurm.conf", "state"]


def test_dry_run_shows_a_four_node_launch(slurm_env, tmp_path):
    allocation = {**slurm_env, "SLURM_JOB_NODELIST": "gpu[07-10]", "SLURM_JOB_NUM_NODES": "4",
                  "SLURM_GPUS_ON_NODE": "8", "SLURM_JOB_ID": "4242", "PYTHON": sys.executable}
    out = {}
    for launcher in ("torchrun", "accelerate"):
        result = subprocess.run(["bash", str(TRAIN_SH), "--dry-run", str(ROOT / "configs" / "tiny.yaml"), "run.name=x"],
                                env={**allocation, "LAUNCHER": launcher}, cwd=tmp_path, capture_output=True,
                                text=True, timeout=120, check=False)
        assert result.returncode == 0, result.stdout + result.stderr
        out[launcher] = result.stdout
    header, node_line = out["torchrun"].splitlines()[0], out["torchrun"].splitlines()[-1]
    assert "4 node(s) [gpu[07-10]], 8 process(es) per node (32 in all" in header
    assert "srun --nodes=4 --ntasks-per-node=1 --kill-on-bad-exit=1" in out["torchrun"]
    port = header.split("master gpu07:")[1].split(",")[0]
    for expected in ("-m torch.distributed.run", "--nproc_per_node 8", "--nnodes 4", "--rdzv_backend c10d",
                     f"--rdzv_endpoint gpu07:{port}", "--rdzv_id gan_dist-4242", "SIGUSR1", "--shutdown-timeout 120",
                     "train.py --config", "run.name=x"):
        assert expected in node_line, f"{expected!r} missing from: {node_line}"
    accelerate_line = out["accelerate"].splitlines()[-1]
    for expected in ("accelerate.commands.launch", "--num_machines 4", "--num_processes 32", "--machine_rank 0",
                     "--main_process_ip gpu07"):
        assert expected in accelerate_line, f"{expected!r} missing from: {accelerate_line}"


def test_two_cpu_processes_train_to_the_end(slurm_env, tmp_path, digits_dir):
    args = _train_args(digits_dir, tmp_path / "runs", "train.max_steps=20")
    code, log = _finish(_submit(slurm_env, tmp_path, ["--gpus-per-node=0"], args, NPROC_PER_NODE="2"), tmp_path)
    assert code == 0, log[-4000:]
    assert "1 node(s) [" in log and "2 process(es) per node (2 in all, 0 GPU(s) per node)" in log, log[-4000:]
    assert "2 processes on the CPU, data parallel over gloo" in log, "the ranks did not see world size 2:\n" + log[-4000:]
    checkpoints = tmp_path / "runs" / "tiny" / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step_00000020"
    assert (checkpoints / "step_00000020" / "state.json").is_file()


def test_config_error_fails_the_job_with_its_message(slurm_env, tmp_path, digits_dir):
    args = _train_args(digits_dir, tmp_path / "runs", "train.batch_sise=3")
    code, log = _finish(_submit(slurm_env, tmp_path, ["--gpus-per-node=0"], args), tmp_path)
    assert code == 2, log
    assert "unknown config key 'train.batch_sise'" in log, log
    assert "nothing was launched" in log, log
    assert not (tmp_path / "runs").exists()


def test_allocated_gpus_that_cuda_cannot_use_stop_the_job_by_name(slurm_env, tmp_path, digits_dir):
    """--gpus-per-node=2 on a node whose GPUs torch cannot use: every rank stops with the
    reason before anything is written, instead of training on the CPU."""
    args = _train_args(digits_dir, tmp_path / "runs", "train.max_steps=2")
    code, log = _finish(_submit(slurm_env, tmp_path, ["--gpus-per-node=2"], args), tmp_path)
    assert code != 0, log[-4000:]
    for rank in (0, 1):
        assert f"[rank {rank}/2] GPUs are allocated to this process (CUDA_VISIBLE_DEVICES=" in log, log[-4000:]
    assert "or set train.device=cpu to train on the CPU on purpose" in log
    assert not (tmp_path / "runs" / "tiny" / "run.json").exists()


def _wait_for_first_checkpoint(run_dir, proc, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while not (run_dir / "checkpoints" / "latest").is_file():
        assert proc.poll() is None, "the job ended before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint within the time limit"
        time.sleep(0.2)


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_preemption_checkpoints_requeues_and_resumes(launcher, slurm_env, tmp_path, digits_dir):
    """USR1 to the batch shell: checkpoint, REQUEUE marker, scontrol requeue, resume, finish."""
    total_steps = LONG_STEPS
    # The node's two GPUs are fake (SLURM sets CUDA_VISIBLE_DEVICES, torch sees no CUDA), which
    # is what a broken CUDA install looks like: train.device=cpu says the CPU is meant.
    args = _train_args(digits_dir, tmp_path / "runs", *LONG_RUN, "train.device=cpu")
    proc = _submit(slurm_env, tmp_path, ["--gpus-per-node=2"], args, LAUNCHER=launcher)
    run_dir = tmp_path / "runs" / "tiny"
    try:
        _wait_for_first_checkpoint(run_dir, proc)
        job_id = proc.stdout.readline().strip()
        subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], env=slurm_env, check=True, timeout=30)
    except BaseException:
        proc.kill()
        raise
    code, log = _finish(proc, tmp_path)
    (tmp_path.parent / f"preemption-{launcher}.log").write_text(log)  # kept for the docs
    assert code == 0, log[-6000:]
    assert "SLURM_RESTART_COUNT=0" in log and "SLURM_RESTART_COUNT=1" in log, log[-6000:]
    assert "2 process(es) per node (2 in all, 2 GPU(s) per node)" in log, log[-6000:]
    assert f"requeued job {job_id}" in log, log[-6000:]
    stopped_at = int(log.split("stopped by SIGUSR1 after step ")[1].split(":")[0])
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{stopped_at:08d}'} at step {stopped_at}" in log
    assert 0 < stopped_at < total_steps
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, total_steps + 1)), "a step was logged twice or not at all"
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{total_steps:08d}"
    assert not (run_dir / "REQUEUE").exists()


def test_plain_scancel_stops_without_requeueing(slurm_env, tmp_path, digits_dir):
    """SIGTERM (scancel) must end the job: requeueing it would make it impossible to cancel."""
    proc = _submit(slurm_env, tmp_path, ["--gpus-per-node=0"], _train_args(digits_dir, tmp_path / "runs", *LONG_RUN),
                   NPROC_PER_NODE="2")
    try:
        _wait_for_first_checkpoint(tmp_path / "runs" / "tiny", proc)
        job_id = proc.stdout.readline().strip()
        subprocess.run(["scancel", job_id], env=slurm_env, check=True, timeout=30)
    except BaseException:
        proc.kill()
        raise
    _, log = _finish(proc, tmp_path, timeout_s=120)
    # sbatch --wait returns once the job is marked cancelled; the batch script still has
    # SLURM's KillWait (30 s) to let the ranks checkpoint and to write its last lines.
    deadline = time.monotonic() + 60
    while "not requeueing" not in log and time.monotonic() < deadline:
        time.sleep(0.5)
        log = (tmp_path / "job.log").read_text()
    assert "stopped by SIGTERM: not requeueing" in log, log[-4000:]
    assert "SLURM_RESTART_COUNT=1" not in log and "requeued job" not in log, log[-4000:]
    queue = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], env=slurm_env, capture_output=True, text=True,
                           check=False)
    assert queue.stdout.strip() in ("", "CANCELLED", "COMPLETING"), queue.stdout


def test_a_requeue_that_terminates_the_whole_job_is_still_reported_as_made(tmp_path, digits_dir):
    """SLURM carries out `scontrol requeue` by sending SIGTERM to every process of the job,
    scontrol itself included (one CI run: "Terminated", then "requeue failed" for a job that
    was requeued). Stubs for srun (the ranks checkpointed after SIGUSR1) and scontrol (which
    terminates its process group, as SLURM does, before it returns): the script still says
    the job was requeued and exits 0."""
    stubs = tmp_path / "bin"
    stubs.mkdir()
    run_dir = tmp_path / "runs" / "tiny"
    (stubs / "srun").write_text(f'#!/bin/bash\nmkdir -p {run_dir}\necho "SIGUSR1 at step 5" > {run_dir}/REQUEUE\n')
    (stubs / "scontrol").write_text(f"""#!/bin/bash
case "$1" in
  show) echo stubhost ;;
  requeue) echo "requeue $2" >> {tmp_path}/requeues; kill -TERM 0; sleep 0.5; echo "requeue $2 returned" >> {tmp_path}/requeues ;;
esac
""")
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "PYTHON": sys.executable, "SLURM_JOB_ID": "77",
           "SLURM_JOB_NODELIST": "stubhost", "GAN_DIST_ROOT": str(ROOT)}
    result = subprocess.run(["bash", str(TRAIN_SH), *_train_args(digits_dir, tmp_path / "runs")], env=env,
                            cwd=tmp_path, capture_output=True, text=True, timeout=120, start_new_session=True,
                            check=False)
    out = result.stdout + result.stderr
    assert (tmp_path / "requeues").read_text() == "requeue 77\nrequeue 77 returned\n", out
    assert result.returncode == 0 and "requeued job 77" in out and "requeue failed" not in out, out


def test_preemption_during_start_up_still_requeues(slurm_env, tmp_path, digits_dir):
    """USR1 as soon as the job runs, before any checkpoint: the job comes back and finishes."""
    args = _train_args(digits_dir, tmp_path / "runs", "train.max_steps=30")
    proc = _submit(slurm_env, tmp_path, ["--gpus-per-node=0"], args, NPROC_PER_NODE="2")
    try:
        job_id = proc.stdout.readline().strip()
        deadline = time.monotonic() + 120
        while "SLURM_RESTART_COUNT=0" not in ((tmp_path / "job.log").read_text() if (tmp_path / "job.log").is_file()
                                               else ""):
            assert time.monotonic() < deadline and proc.poll() is None, "the job did not start"
            time.sleep(0.1)
        subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], env=slurm_env, check=True, timeout=30)
    except BaseException:
        proc.kill()
        raise
    code, log = _finish(proc, tmp_path)
    assert code == 0, log[-6000:]
    assert "SLURM_RESTART_COUNT=1" in log and f"requeued job {job_id}" in log, log[-6000:]
    assert (tmp_path / "runs" / "tiny" / "checkpoints" / "latest").read_text().strip() == "step_00000030"
