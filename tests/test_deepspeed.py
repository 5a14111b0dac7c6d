"""train.backend=deepspeed on CPU with 2 gloo processes: ZeRO-1/2 equal DDP, G's loss never
reaches D, exact resume, per-rank memory, and the accelerate launcher. Two launches in all
(DeepSpeed's first start JIT-compiles a comm op, about 47 s, then it is cached): the cases
of tests/helpers/ds_harness.py under torchrun, and train.py under `accelerate launch`.
"""

import os
import subprocess

import pytest
import torch
from conftest import HELPERS, ROOT
from test_launch import LAUNCHERS, _free_port, _launch

from gan_dist.data.prepare import write_shards
from gan_dist.data.sources import digits

pytestmark = pytest.mark.launch

if os.environ.get("CI") != "true":  # CI installs the extra; elsewhere say why these tests skip
    pytest.importorskip("deepspeed", reason="install the extra: bash launch/setup.sh --deepspeed")

CASES = ["ddp", "zero1", "zero2", "ddp-code", "zero2-code", "ddp-modern", "zero2-modern", "bf16-zero2-code", "zero1-unfrozen", "resume-full", "resume-leg1", "resume-leg2", "bf16-zero2",
         "bf16-dcgan-zero1", "nan-zero0", "nan-zero1", "nan-zero2",
         "memory-zero0", "memory-zero1", "memory-zero2"]
NETS = ("G", "D")


@pytest.fixture(scope="module")
def ds(digits_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("deepspeed")
    digits16 = write_shards(digits(16), out / "digits16")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "WORLD_SIZE", "RANK"))}
    env.update(PYTHONPATH=f"{HELPERS}{os.pathsep}{ROOT}", OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    command = [*LAUNCHERS["torchrun"](_free_port()), str(HELPERS / "ds_harness.py"), str(digits_dir),
               str(digits16), str(out), *CASES]
    result = subprocess.run(command, env=env, cwd=out, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    def load(case: str, rank: int = 0) -> dict:
        state = torch.load(out / case / f"rank{rank}.pt")
        assert state["outcome"] == "ok", f"{case}: {state['outcome']}"
        assert state["world_size"] == 2
        return state

    return load


def _max_diff(a: dict, b: dict, nets=NETS) -> float:
    return max((a[net][k] - b[net][k]).abs().max().item() for net in nets for k in a[net])


@pytest.mark.parametrize("ddp_case, zero_case", [("ddp", "zero1"), ("ddp", "zero2"), ("ddp-code", "zero2-code"),
                                                ("ddp-modern", "zero2-modern")])
def test_zero_matches_ddp_after_five_iterations(ds, ddp_case, zero_case):
    ddp, zero = ds(ddp_case), ds(zero_case)
    assert all(torch.equal(ddp["G0"][k], zero["G0"][k]) for k in ddp["G0"]), "not the same initial weights"
    moved = max((ddp["G"][k] - ddp["G0"][k]).abs().max().item() for k in ddp["G0"])
    assert moved > 1e-3, "training did not move G: the comparison would prove nothing"
    assert ddp["step"] == zero["step"] == 5
    assert _max_diff(ddp, zero) <= 1e-5
    for rank in (0, 1):  # every rank ends with the same weights
        assert _max_diff(zero, ds(zero_case, rank)) == 0


@pytest.mark.parametrize("stage", [1, 2])
def test_g_loss_never_reaches_d(ds, stage):
    leaks = ds(f"zero{stage}")["leak"]
    assert len(leaks) == 5 and all(leak == 0 for leak in leaks), leaks


def test_the_leak_probe_sees_an_unfrozen_d(ds):
    """The negative control: with D left trainable in G's step, the probe reports its gradients."""
    assert all(leak > 0 for leak in ds("zero1-unfrozen")["leak"])


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_a_nan_on_one_rank_makes_every_rank_skip_the_step(ds, stage):
    ranks = [ds(f"nan-zero{stage}", rank) for rank in (0, 1)]
    assert [r["skipped"] for r in ranks] == [{"G": 0, "D": 1}] * 2
    assert _max_diff(ranks[0], ranks[1]) == 0
    assert all(torch.isfinite(v).all() for net in NETS for v in ranks[0][net].values())


def test_stop_after_ten_and_resume_equals_twenty_in_one_go(ds):
    full, split = ds("resume-full"), ds("resume-leg2")
    assert ds("resume-leg1")["step"] == 10 and full["step"] == split["step"] == 20
    assert _max_diff(full, split, nets=("G", "D", "G_ema")) == 0  # bitwise


@pytest.mark.parametrize("case, steps", [("bf16-zero2", 4), ("bf16-dcgan-zero1", 2), ("bf16-zero2-code", 4)])
def test_bf16_engines_train_with_finite_weights(ds, case, steps):
    state = ds(case)
    assert state["step"] == steps and state["skipped"] == {"G": 0, "D": 0}
    assert all(torch.isfinite(v).all() for net in (*NETS, "G_ema") for v in state[net].values())


def test_bf16_engines_keep_norm_statistics_in_fp32(ds):
    """BatchNorm's running statistics (G) and spectral norm's power-iteration vectors (D) stay
    fp32 beside the engines' bf16 weights, and moved from their initial values."""
    state = ds("bf16-dcgan-zero1")
    statistics = {(net, k): dtype for net, dtypes in state["dtypes"].items() for k, dtype in dtypes.items()
                  if k.endswith(("running_mean", "running_var", "_u", "_v"))}
    assert any(net == "G" for net, _ in statistics) and any(net == "D" for net, _ in statistics)
    assert set(statistics.values()) == {torch.float32}, statistics
    assert state["dtypes"]["D"]["features.0.parametrizations.weight.original"] == torch.bfloat16
    assert any(state["G"][k].abs().sum() > 0 for _, k in statistics if k.endswith("running_mean"))


def test_bf16_engines_hold_half_size_weights(ds):
    state = ds("bf16-zero2")
    assert state["memory"]["G"]["parameters"] * 2 == ds("zero2")["memory"]["G"]["parameters"]


def test_zero_stages_shard_optimizer_state_and_gradients(ds):
    memory = {stage: ds(f"memory-zero{stage}")["memory"] for stage in (0, 1, 2)}
    for net in NETS:
        full = memory[0][net]
        assert memory[1][net]["parameters"] == memory[2][net]["parameters"] == full["parameters"]
        for stage in (1, 2):  # each of 2 ranks keeps half of Adam's moments (up to alignment padding)
            assert memory[stage][net]["optimizer_state"] == pytest.approx(full["optimizer_state"] / 2, rel=0.02)
            assert memory[stage][net]["master_weights"] == pytest.approx(full["parameters"] / 2, rel=0.02)
        assert memory[2][net]["gradients"] == pytest.approx(full["gradients"] / 2, rel=0.02)
        assert full["master_weights"] == 0
        # Reduction buckets sized to the network (under 1M parameters: 2^20 fp32 elements),
        # not DeepSpeed's 5e8-element default (2 GB per engine).
        assert 0 < memory[1][net]["buckets"] <= 2**20 * 4 and 0 < memory[2][net]["buckets"] <= 2**20 * 4, memory


def test_accelerate_launch_with_a_plain_multi_process_config(digits_dir, tmp_path):
    buckets = ROOT / "launch" / "deepspeed" / "zero2-buckets.json"  # the shipped example, merged into D's engine
    result = _launch(LAUNCHERS["accelerate"](_free_port()), digits_dir, tmp_path, "train.backend=deepspeed",
                     "deepspeed.zero_stage=2", f"deepspeed.discriminator_json={buckets}", timeout_s=400)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "2 processes on the CPU, data parallel over gloo" in result.stdout and "ZeRO-2" in result.stdout
    ranks = [torch.load(tmp_path / "probe" / f"rank{r}.pt") for r in (0, 1)]
    assert [r["rank"] for r in ranks] == [0, 1] and ranks[0]["first_keys"] != ranks[1]["first_keys"]
    for net in NETS:
        assert all(torch.equal(v, ranks[1][net][k]) for k, v in ranks[0][net].items())
