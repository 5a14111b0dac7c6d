"""Checkpoints and exact resume (one process, in-process; the 2-process case is in test_distributed)."""

import json
import os
import pickle
import stat

import numpy as np
import pytest
import torch
from conftest import tiny_args
from safetensors.torch import load_file

from gan_dist import resume

# 40 steps of 32 in all; the first leg stops at an odd step so that the resumed loader must
# start from its second worker (2 workers take turns).
FULL = ("train.total_kimg=2", "data.num_workers=2", "checkpoint.every_kimg=0", "log.every_steps=7",
        "log.sample_every_kimg=0.3", "train.ema_half_life_kimg=0.2", "loss.r1_gamma=1", "loss.r1_interval=3")


def _final(run_dir, step: int):
    ckpt = run_dir / "checkpoints" / f"step_{step:08d}"
    weights = {name: load_file(str(ckpt / f"{name}.safetensors")) for name in ("G", "D", "G_ema")}
    return weights, resume.load_tensors(ckpt / "optimizers.pt"), json.loads((ckpt / "state.json").read_text())


def _assert_bitwise_equal(a, b, where=""):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_bitwise_equal(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_bitwise_equal(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{where} differs"
    else:
        assert a == b, where


# R3GAN's recipe, every schedule 1 kimg long: the stop at step 21 (0.67 kimg) is mid-horizon.
# Its G phase reads reals too: 2 batches a step, so the worker next in turn follows the batch
# count, not the D steps.
MODERN = ("loss.name=relativistic", "loss.r2=true", "loss.r1_interval=1", "loss.gamma_schedule.end=0.1",
          "loss.gamma_schedule.kimg=1", "optim.generator.lr_schedule.end=2e-5", "optim.generator.lr_schedule.kimg=1",
          "optim.discriminator.beta2_schedule.end=0.99", "optim.discriminator.beta2_schedule.kimg=1",
          "train.ema_half_life_kimg=0", "train.ema_half_life_schedule.end=0.5", "train.ema_half_life_schedule.kimg=1",
          "data.diffaugment=translation", "data.augment_p=0", "data.augment_p_schedule.end=0.5",
          "data.augment_p_schedule.kimg=1")
# ADA adjusts p every 4 D steps: the stop at step 21 falls between two adjustments, so each
# rank's sums since the last one are part of the checkpoint.
ADA = ("data.augment=bgc,cutout", "data.augment_p=0.3", "data.ada_kimg=1.28")
CASES = {"streamed": ("data.resident=off",), "resident": ("data.resident=host",),
         "modern, streamed": ("data.resident=off", *MODERN), "ada, resident": ("data.resident=host", *ADA)}


@pytest.mark.parametrize("case", list(CASES))
def test_stop_and_resume_equals_the_uninterrupted_run(train_main, digits_dir, tmp_path, case):
    """Streamed (2 workers) and resident, on chunks of 64: the stop at step 21 of 32-sample
    batches lies inside a chunk. With schedules the resumed leg also lengthens the run
    (train.total_kimg 2 -> 3), which must leave every schedule where it was."""
    flags = (*FULL, *CASES[case])
    assert train_main(*tiny_args(digits_dir, *flags, "run.name=full", "train.max_steps=40"))[0] == 0
    assert train_main(*tiny_args(digits_dir, *flags, "run.name=split", "train.max_steps=21"))[0] == 0
    workers = json.loads((tmp_path / "runs" / "split" / "checkpoints" / "step_00000021" / "rank0.json").read_text())
    positions = [position[1] for position in workers["stream"]["workers"].values()]
    assert len(positions) == (1 if "resident" in case else 2) and any(p % 64 for p in positions)
    longer = ("train.total_kimg=3",) if "modern" in case else ()
    code, out, err = train_main(*tiny_args(digits_dir, *flags, *longer, "run.name=split", "train.max_steps=40"))
    assert code == 0, err
    assert "resumed from" in out and "step_00000021 at step 21" in out
    full, split = _final(tmp_path / "runs" / "full", 40), _final(tmp_path / "runs" / "split", 40)
    _assert_bitwise_equal(full[0], split[0], "weights")
    _assert_bitwise_equal(full[1], split[1], "optimizers")
    if "ada" in case:
        assert full[2]["ada"] == split[2]["ada"] and full[2]["ada"]["p"] != 0.3, full[2]["ada"]
    assert full[2]["progress"] == split[2]["progress"] and full[2]["ema_num_averaged"] == 40
    assert full[2]["progress"]["num_batches"] == 40 * (2 if "modern" in case else 1)
    moved = _final(tmp_path / "runs" / "split", 21)[0]["G"]
    assert any(not torch.equal(moved[k], full[0]["G"][k]) for k in moved), "the second leg trained nothing"


def test_changed_width_is_refused_and_changed_length_accepted(train_main, digits_dir, tmp_path):
    assert train_main(*tiny_args(digits_dir, "train.max_steps=3"))[0] == 0
    code, _, err = train_main(*tiny_args(digits_dir, "train.max_steps=6", "model.width_mult=0.25"))
    assert code == 2 and "model.width_mult: 0.125 -> 0.25" in err and "Traceback" not in err
    code, out, err = train_main(*tiny_args(digits_dir, "train.max_steps=6", "train.total_kimg=3"))
    assert code == 0, err
    assert "at step 3" in out and (tmp_path / "runs" / "tiny" / "checkpoints" / "step_00000006").is_dir()


def test_a_crash_during_a_save_leaves_the_previous_checkpoint(train_main, digits_dir, tmp_path, monkeypatch):
    args = tiny_args(digits_dir, "checkpoint.every_kimg=0.32", "train.max_steps=30")  # a checkpoint every 10 steps

    def crash_at_step_20(path):
        if "step_00000020" in str(path) and path.name == "optimizers.pt":
            raise KeyboardInterrupt("killed between files")

    monkeypatch.setattr(resume, "_after_file_hook", crash_at_step_20)
    with pytest.raises(KeyboardInterrupt):
        train_main(*args)
    checkpoints = tmp_path / "runs" / "tiny" / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step_00000010"
    assert (checkpoints / "step_00000020.tmp").is_dir() and not (checkpoints / "step_00000020").exists()
    monkeypatch.setattr(resume, "_after_file_hook", None)
    code, out, err = train_main(*args)
    assert code == 0, err
    assert "step_00000010 at step 10" in out and (checkpoints / "latest").read_text().strip() == "step_00000030"


class _Payload:
    def __reduce__(self):
        import os

        return os.system, ("touch payload-ran",)


def test_a_code_executing_pickle_is_refused_unrun(train_main, digits_dir, tmp_path):
    assert train_main(*tiny_args(digits_dir, "train.max_steps=2"))[0] == 0
    ckpt = tmp_path / "runs" / "tiny" / "checkpoints" / "step_00000002"
    (ckpt / "optimizers.pt").write_bytes(pickle.dumps(_Payload()))
    code, _, err = train_main(*tiny_args(digits_dir, "train.max_steps=4"))
    assert code == 2 and "refused to load" in err and "optimizers.pt" in err
    assert not (tmp_path / "payload-ran").exists()


def test_unknown_checkpoint_format_is_a_clear_error(train_main, digits_dir, tmp_path):
    assert train_main(*tiny_args(digits_dir, "train.max_steps=2"))[0] == 0
    state_file = tmp_path / "runs" / "tiny" / "checkpoints" / "step_00000002" / "state.json"
    state_file.write_text(json.dumps({**json.loads(state_file.read_text()), "format": "gan_dist.checkpoint/9"}))
    code, _, err = train_main(*tiny_args(digits_dir, "train.max_steps=4"))
    assert code == 2 and "'gan_dist.checkpoint/9'" in err and "reads gan_dist.checkpoint/1" in err


def test_kill_9_during_a_run_leaves_a_loadable_latest(digits_dir, tmp_path, train_main):
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT

    args = tiny_args(digits_dir, "checkpoint.every_kimg=0.032", "train.total_kimg=100000", "log.every_steps=1000",
                     "log.sample_every_kimg=100000", f"run.root={tmp_path / 'runs'}")
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = tmp_path / "runs" / "tiny" / "checkpoints"
    try:
        for _ in range(600):  # until a few checkpoints (one per step) have been written
            if len(list(checkpoints.glob("step_*"))) >= 3:
                break
            time.sleep(0.05)
        time.sleep(0.37)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    latest = checkpoints / (checkpoints / "latest").read_text().strip()
    state = resume.read_state(latest)
    step = state["progress"]["step"]
    code, out, err = train_main(*args, f"train.max_steps={step + 2}")
    assert code == 0, err
    assert f"at step {step} " in out


def test_export_then_sample_equals_sampling_the_run(train_main, digits_dir, tmp_path, capsys):
    from PIL import Image

    from gan_dist.cli import main as cli_main

    assert train_main(*tiny_args(digits_dir, "train.max_steps=4", "model.conditional=true"))[0] == 0
    run = str(tmp_path / "runs" / "tiny")
    assert cli_main(["export", "--run", run, "--out", str(tmp_path / "model")]) == 0
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["G_ema.safetensors", "model.json"]
    common = ["--num", "12", "--seed", "5", "--truncation", "1.5"]
    assert cli_main(["sample", "--model", str(tmp_path / "model"), *common, "--out", str(tmp_path / "a.png")]) == 0
    assert cli_main(["sample", "--run", run, *common, "--out", str(tmp_path / "b.png")]) == 0
    a, b = (np.asarray(Image.open(tmp_path / f"{n}.png")) for n in "ab")
    assert a.shape == b.shape and np.array_equal(a, b)
    assert cli_main(["sample", "--run", run, *common, "--out", str(tmp_path / "other.png"), "--seed", "6"]) == 0
    assert not np.array_equal(a, np.asarray(Image.open(tmp_path / "other.png")))
    assert cli_main(["sample", "--run", run, "--num", "5", "--class", "7", "--out", str(tmp_path / "sevens")]) == 0
    assert len(list((tmp_path / "sevens").glob("*.png"))) == 5
    assert cli_main(["sample", "--run", run, "--class", "12", "--out", str(tmp_path / "x.png")]) == 2
    assert "--class must be in 0..9" in capsys.readouterr().err


def _umask() -> int:
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def test_exported_and_checkpoint_files_take_the_umask_mode(train_main, digits_dir, tmp_path):
    """safetensors' save_file leaves 0600; every file of a checkpoint and an export gets 0666 less the umask."""
    from gan_dist.cli import main as cli_main

    assert train_main(*tiny_args(digits_dir, "train.max_steps=2"))[0] == 0
    run = tmp_path / "runs" / "tiny"
    assert cli_main(["export", "--run", str(run), "--out", str(tmp_path / "model")]) == 0
    expected = 0o666 & ~_umask()
    checkpoint = run / "checkpoints" / "step_00000002"
    files = [*checkpoint.glob("*.safetensors"), checkpoint / "model.json", *(tmp_path / "model").iterdir()]
    modes = {str(path.relative_to(tmp_path)): oct(stat.S_IMODE(path.stat().st_mode)) for path in files}
    assert len(modes) == 6 and set(modes.values()) == {oct(expected)}, modes


def test_rollback_on_divergence_recovers_from_a_bad_patch(train_main, digits_dir, tmp_path, monkeypatch):
    """NaN reals for 4 batches after a checkpoint: roll back once, then train on to the end."""
    monkeypatch.setenv("NAN_REALS_COUNT", "4")
    code, out, err = train_main(*tiny_args(digits_dir, "plugins=[nan_reals]", "train.rollback_on_divergence=true",
                                           "train.max_skipped_in_row=3", "checkpoint.every_kimg=0.064",
                                           "train.max_steps=12", "log.every_steps=4"))
    assert code == 0, err
    # Batches 3-6 are NaN: D skips steps 3-4, the step-4 checkpoint is written, step 5 makes 3
    # in a row; back at step 4 with new noise, batch 6 is the last NaN one.
    assert "rolled back to step_00000004 with new noise (rollback 1)" in out and "rollback 2" not in out
    records = [json.loads(line) for line in (tmp_path / "runs" / "tiny" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["Rollbacks"] == 1 and records[-1]["step"] == 12
    times = [r["time_s"] for r in records]
    assert times == sorted(times), "the rollback set the training time back"


def test_rollback_gives_up_after_three_tries(train_main, digits_dir, tmp_path):
    code, out, err = train_main(*tiny_args(digits_dir, "plugins=[nan_reals]", "train.rollback_on_divergence=true",
                                           "train.max_skipped_in_row=2", "checkpoint.every_kimg=0.064",
                                           "train.max_steps=30"))
    assert code == 2 and "3 rollbacks in a row: training has diverged" in err
    assert out.count("rolled back to step_00000002") == 3 and "rollback 3)" in out


def test_three_legs_equal_one_run(train_main, digits_dir, tmp_path):
    """Positions and batch counts carry across chained resumes (a one-step leg included)."""
    assert train_main(*tiny_args(digits_dir, *FULL, "run.name=full", "train.max_steps=40"))[0] == 0
    for steps in (21, 22, 31, 40):
        code, _, err = train_main(*tiny_args(digits_dir, *FULL, "run.name=legs", f"train.max_steps={steps}"))
        assert code == 0, err
    full, legs = _final(tmp_path / "runs" / "full", 40), _final(tmp_path / "runs" / "legs", 40)
    _assert_bitwise_equal(full[0], legs[0], "weights")
    _assert_bitwise_equal(full[1], legs[1], "optimizers")


def test_pruning_keeps_the_newest_and_resaving_a_step_is_harmless(train_main, digits_dir, tmp_path):
    args = tiny_args(digits_dir, "checkpoint.every_kimg=0.064", "checkpoint.keep_last=2", "train.max_steps=8")
    assert train_main(*args)[0] == 0
    checkpoints = tmp_path / "runs" / "tiny" / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step_*")) == ["step_00000006", "step_00000008"]
    assert train_main(*args)[0] == 0  # a finished run again: nothing to train, nothing lost
    assert (checkpoints / "latest").read_text().strip() == "step_00000008"
    assert resume.read_state(checkpoints / "step_00000008")["progress"]["step"] == 8


def test_resuming_on_data_of_another_shape_is_refused(train_main, digits_dir, tmp_path):
    from gan_dist.data.prepare import write_shards
    from gan_dist.data.sources import digits

    assert train_main(*tiny_args(digits_dir, "train.max_steps=2", "model.name=dcgan", f"data.path={digits_dir}"))[0] == 2
    assert train_main(*tiny_args(digits_dir, "train.max_steps=2"))[0] == 0
    other = write_shards(digits(16), tmp_path / "d16")
    code, _, err = train_main(*tiny_args(digits_dir, "train.max_steps=4", f"data.path={other}"))
    assert code == 2 and "trained on samples of shape [1, 8, 8]" in err and "Traceback" not in err


def test_resume_may_switch_between_fused_and_foreach_adam(train_main, digits_dir, tmp_path):
    """optim.fused may change at resume: the loaded optimizer takes this run's kernels."""
    code, _, err = train_main(*tiny_args(digits_dir, "optim.fused=false", "train.max_steps=10"))
    assert code == 0, err
    code, out, err = train_main(*tiny_args(digits_dir, "optim.fused=true", "train.max_steps=20"))
    assert code == 0, err
    assert "resumed from" in out
    record = json.loads((tmp_path / "runs" / "tiny" / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["step"] == 20


def test_a_divergence_in_the_last_steps_still_rolls_back(train_main, digits_dir, tmp_path, monkeypatch):
    """Skips are counted at the end too, inside the loop: the last steps may still roll back."""
    monkeypatch.setenv("NAN_REALS_COUNT", "2")  # batches 3 and 4: steps 3 and 4 of 4 skip D
    code, out, err = train_main(*tiny_args(digits_dir, "plugins=[nan_reals]", "train.rollback_on_divergence=true",
                                           "train.max_skipped_in_row=2", "checkpoint.every_kimg=0.096",
                                           "train.max_steps=4", "log.every_steps=10"))
    assert code == 0, err
    assert "rolled back to step_00000003 with new noise (rollback 1)" in out


@pytest.mark.parametrize("how", ["recorded", "older checkpoint"])
def test_a_device_change_is_a_layout_change(train_main, digits_dir, tmp_path, how):
    """A checkpoint from a CUDA run resumed on a CPU (and the other way round): the device
    generators' states do not fit, so the streams are re-derived, with one message. Checkpoints
    from before state.json recorded the device tell it by their CUDA RNG state."""
    assert train_main(*tiny_args(digits_dir, "train.max_steps=5"))[0] == 0
    checkpoint = tmp_path / "runs" / "tiny" / "checkpoints" / "step_00000005"
    state = json.loads((checkpoint / "state.json").read_text())
    assert state["device"] == "cpu"
    if how == "recorded":
        state["device"] = "cuda"
    else:
        del state["device"]
        tensors = resume.load_tensors(checkpoint / "rank0.pt")
        tensors["cuda"] = torch.zeros(16, dtype=torch.uint8)  # what a CUDA process saves beside the rest
        torch.save(tensors, checkpoint / "rank0.pt")
    (checkpoint / "state.json").write_text(json.dumps(state))
    code, out, err = train_main(*tiny_args(digits_dir, "train.max_steps=10"))
    assert code == 0, err
    assert "resumed with 1 processes x resident on cpu, dataset" in out
    assert "where the checkpoint had 1 processes x resident on cuda" in out
    assert "resumed from" in out and "at step 5" in out
    assert json.loads((checkpoint.parent / "step_00000010" / "state.json").read_text())["device"] == "cpu"


def test_resume_is_exact_with_deferred_shards_and_fewer_shards_than_slots(train_main, tmp_path, monkeypatch):
    """3 shards on 4 loader workers, each planned piece breaking off half-way on the run's first
    read of it (a dropped connection): the rest is deferred and retried. The resumed legs (21,
    22, 40 steps) meet no failure (the storage is back) and replay the ones the first leg
    met, so the run ends bit-identical to the uninterrupted one."""
    from gan_dist.data import stream
    from gan_dist.data.plan import plan_epoch
    from gan_dist.data.prepare import write_shards
    from gan_dist.data.sources import digits

    data = write_shards(digits(), tmp_path / "three", shard_size=600, chunk=50)
    counts = [600, 600, 597]
    planned = {p for epoch in range(3) for pieces in plan_epoch(counts, 0, epoch, 4) for p in pieces}
    read_piece, marks = stream.read_piece, {}

    def dropped_half_way(url, piece, *args, **kwargs):  # forked into the loader workers
        mark, delivered = marks["dir"] / f"{piece.shard}-{piece.start}-{piece.stop}", 0
        for record in read_piece(url, piece, *args, **kwargs):
            if piece in planned and delivered >= piece.size // 2 and not mark.exists():
                mark.touch()
                raise stream.ReadFailure(f"{url}: connection reset")
            delivered += len(record)
            yield record

    def run(name: str, steps: int):
        marks["dir"] = tmp_path / f"marks-{name}"  # one storage outage per run
        marks["dir"].mkdir(exist_ok=True)
        return train_main(*tiny_args(data, *flags, f"run.name={name}", f"train.max_steps={steps}"))

    monkeypatch.setattr(stream, "read_piece", dropped_half_way)
    flags = (*FULL, "data.num_workers=4", "data.retry_backoff_s=0", "data.shuffle_buffer=16", "data.resident=off")
    assert run("full", 40)[0] == 0
    assert run("split", 21)[0] == 0
    leg1 = [json.loads(line) for line in (tmp_path / "runs" / "split" / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["Data/shard_failures"] for r in leg1) >= 1
    stream_state = json.loads((tmp_path / "runs" / "split" / "checkpoints" / "step_00000021" / "rank0.json").read_text())
    assert any(position[2] for position in stream_state["stream"]["workers"].values())
    # A crashed attempt from step 21 left a failure that this stream never had: it must not count.
    stale = tmp_path / "runs" / "split" / ".stream" / "from-step-21"
    stale.mkdir(parents=True)
    (stale / "rank0-worker0.jsonl").write_text("[0, 1, 3]\n")
    # One step, then on: most workers make no batch in between, so their positions (and
    # failures) come from the checkpoint as they were restored.
    assert run("split", 22)[0] == 0
    code, out, err = run("split", 40)
    assert code == 0, err
    assert "step_00000022 at step 22" in out
    full, split = _final(tmp_path / "runs" / "full", 40), _final(tmp_path / "runs" / "split", 40)
    _assert_bitwise_equal(full[0], split[0], "weights")
    _assert_bitwise_equal(full[1], split[1], "optimizers")


def test_a_re_prepared_dataset_is_a_layout_change(train_main, tmp_path):
    from gan_dist.data.prepare import write_shards
    from gan_dist.data.sources import digits

    data = write_shards(digits(), tmp_path / "d")
    assert train_main(*tiny_args(data, "train.max_steps=5"))[0] == 0
    write_shards(digits(), data, force=True, seed=1)  # the same images in another order
    code, out, err = train_main(*tiny_args(data, "train.max_steps=10"))
    assert code == 0, err
    assert "the dataset differs from the checkpoint's" in out and "start at the next epoch" in out
    state = json.loads((tmp_path / "runs" / "tiny" / "checkpoints" / "step_00000010" / "state.json").read_text())
    assert state["dataset"] == open_dataset_identity(data) and state["dataset_identity"]["order"] == "shuffled"


def open_dataset_identity(path) -> str:
    from gan_dist.data.stream import open_dataset

    return open_dataset(str(path)).identity()["sha256"]


@pytest.mark.parametrize("model_json, data_classes, refused", [
    ({"shape": [1, 8, 8], "num_classes": 0, "data_num_classes": 10}, 10, False),  # unconditional G on the digits
    ({"shape": [1, 8, 8], "num_classes": 0, "data_num_classes": 10}, 3, True),  # other data
    ({"shape": [1, 8, 8], "num_classes": 10}, 10, False),  # written before data_num_classes
    ({"shape": [1, 8, 8], "num_classes": 10}, 0, True),
])
def test_a_resume_checks_the_datas_classes_not_gs(tmp_path, model_json, data_classes, refused):
    from types import SimpleNamespace

    from gan_dist.errors import UserError
    from gan_dist.resume import check_data_matches

    (tmp_path / "model.json").write_text(json.dumps(model_json))
    info = SimpleNamespace(shape=(1, 8, 8), num_classes=data_classes)
    if refused:
        with pytest.raises(UserError, match="point data.path at the run's data"):
            check_data_matches(tmp_path, info)
    else:
        check_data_matches(tmp_path, info)
