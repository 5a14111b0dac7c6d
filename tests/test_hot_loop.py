"""The hot loop's hygiene: no per-step host synchronisation (counted with torch.profiler, as
bench/profile_loop.py does), and the GPU fast-path options (channels_last, torch.compile with
R1 kept eager) train like the plain path. On CPU, one process."""

import sys

import pytest
from conftest import ROOT, tiny_args
from safetensors.torch import load_file

sys.path.insert(0, str(ROOT / "bench"))
from profile_loop import count_syncs

STEPS, LOG_EVERY = 20, 5  # a per-step sync would count at least STEPS, far above the bound


ADA = ("data.augment=bgc,cutout", "data.augment_p=0.2", "data.ada_kimg=1")


@pytest.mark.parametrize("precision, ada", [("no", True), ("fp16", False)])  # the plain path is ADA's minus ADA
def test_the_loop_syncs_with_the_host_only_at_log_lines(digits_dir, tmp_path, monkeypatch, precision, ada):
    """fp16 too: one grad scaler per network, the skip decision and the penalty's scale stay on
    the device (count_syncs runs R1 every 4th D step). With ADA, p, its signal and the
    operations' choices stay on the device as well."""
    monkeypatch.chdir(tmp_path)
    extra = (f"train.mixed_precision={precision}", *(ADA if ada else ()))
    short, long = (count_syncs(steps, LOG_EVERY, str(digits_dir), extra=extra)["loop"] for steps in (STEPS, 2 * STEPS))
    # At most one per log line plus a constant for start-up and the end; not one per step.
    assert short <= STEPS // LOG_EVERY + 6 and long <= 2 * STEPS // LOG_EVERY + 6, (short, long)


def test_the_probe_sees_a_per_step_sync(digits_dir, tmp_path, monkeypatch):
    """The negative control: foreach Adam reads the skip decision on the host every step."""
    monkeypatch.chdir(tmp_path)
    assert count_syncs(STEPS, LOG_EVERY, str(digits_dir), extra=("optim.fused=false",))["loop"] >= 2 * STEPS


@pytest.mark.launch  # torch.compile on a CPU takes about a minute
def test_channels_last_and_compile_train_like_the_plain_path(train_main, digits_dir, tmp_path):
    """In float64: in float32 the compiled kernels sum in another order, and Adam turns a
    rounding-sized gradient on a near-zero element into a whole step (one CI run measured
    1.2e-4 apart after 6 steps); float64 keeps the comparison about the graphs."""
    import torch

    dcgan = ["model.name=dcgan", "model.width_mult=0.125", "data.resolution=16", "loss.r1_gamma=1",
             "loss.r1_interval=2", "train.max_steps=6", "data.num_workers=0", "train.num_threads=1"]
    from gan_dist.data.prepare import write_shards
    from gan_dist.data.sources import digits

    data = write_shards(digits(16), tmp_path / "digits16")
    weights = {}
    torch.set_default_dtype(torch.float64)
    try:
        for name, extra in (("plain", []), ("fast", ["train.channels_last=true", "train.compile=true"])):
            args = [*tiny_args(digits_dir, *dcgan, f"run.name={name}", *extra)]
            args[3] = f"data.path={data}"
            code, _, err = train_main(*args)
            assert code == 0, err
            weights[name] = load_file(str(tmp_path / "runs" / name / "checkpoints" / "step_00000006" / "G.safetensors"))
    finally:
        torch.set_default_dtype(torch.float32)
    assert {t.dtype for t in weights["plain"].values() if t.is_floating_point()} == {torch.float64}
    diff = max((weights["plain"][k] - weights["fast"][k]).abs().max().item() for k in weights["plain"])
    assert diff < 1e-9, diff


@pytest.mark.launch  # 4 processes, about 25 s on a CPU
def test_the_gpu_check_dry_run_runs_every_check(tmp_path):
    """bench/gpu.sh --dry-run: the GPU script's every check at toy sizes on the CPU, from
    outside the repository, with its outputs (the log and the tables, nothing else) in --out."""
    import os
    import subprocess

    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable}
    result = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), "--dry-run", "--out", str(out)], env=env,
                            cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["gpu.md", "log"]
    table = (out / "gpu.md").read_text()
    assert "FAILED" not in table, table
    for check in ("fp16 + R1 trains", "bf16 + R1 trains", "fused Adam found_inf | cpu, a NaN D step | PASS",
                  "CPU checkpoint resumes", "real loader, 1 worker(s), streamed", "real loader, 2 worker(s), streamed",
                  "real loader, resident on the device"):
        assert check in table, check
    speed = [line for line in table.splitlines() if line.startswith(("| DCGAN-64", "| ResNet-32"))]
    assert len(speed) == 8 and sum("compiled on a GPU only" in line for line in speed) == 2, speed
    assert "host syncs per step" in (out / "log").read_text()
