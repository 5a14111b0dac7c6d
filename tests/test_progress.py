"""Progress of the long steps outside training: the helper's plain lines (fake clock), its
terminal bar, and what prepare, the cls classifier and evaluation print without a TTY."""

import contextlib
import functools
import io
import json
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import ROOT
from rich.console import Console

from gan_dist.progress import format_duration, task_progress


class FakeClock:
    def __init__(self):
        self.now_s = 0.0

    def __call__(self) -> float:
        return self.now_s


def test_plain_lines_start_rate_limited_middle_and_end(capsys):
    clock = FakeClock()
    with task_progress("extract", 100, "images", tty=False, clock=clock, heartbeat_s=10, min_gap_s=1) as shown:
        for now_s, n in ((0.5, 12), (0.9, 3), (1.2, 1), (1.3, 10), (5.0, 1), (9.0, 1), (15.5, 1), (16.0, 30),
                         (17.0, 40)):
            clock.now_s = now_s
            shown.advance(n, loss=0.25)
        clock.now_s = 22.0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "extract: started, 100 images",
        # 12 reached a tenth at 0.5 s, inside the minimum gap: said at the next advance after it
        "extract: 16/100 images (16%), 1.2 s, 13 images/s, loss 0.25",
        # 26, a tenth past that line, came 0.1 s after it: likewise held back
        "extract: 27/100 images (27%), 5.0 s, 5.4 images/s, loss 0.25",
        # no tenth reached since, but 10 s without a line: a heartbeat
        "extract: 29/100 images (29%), 15.5 s, 1.9 images/s, loss 0.25",
        # 59 came 0.5 s after the heartbeat (held back), 99 a second later
        "extract: 99/100 images (99%), 17.0 s, 5.8 images/s, loss 0.25",
        "extract: done, 99/100 images in 22.0 s (4.5 images/s), loss 0.25",
    ]


def test_plain_lines_without_a_total_and_where_a_failed_step_stopped(capsys):
    clock = FakeClock()
    with pytest.raises(RuntimeError), task_progress("read", None, "rows", tty=False, clock=clock) as shown:
        shown.advance(7)
        clock.now_s = 75.0
        raise RuntimeError("disk gone")
    assert capsys.readouterr().out.splitlines() == ["read: started", "read: stopped at 7 rows after 1 min 15 s"]
    assert format_duration(7322) == "2 h 02 min"


def test_disabled_progress_prints_nothing(capsys):
    with task_progress("rank 1", 10, "items", enabled=False, tty=False) as shown:
        shown.advance(10, loss=1.0)
    assert capsys.readouterr().out == ""


def test_on_a_terminal_a_rich_bar_keeps_its_finished_line():
    stream = io.StringIO()
    console = Console(file=stream, force_terminal=True, width=120)
    with task_progress("features", 10, "images", console=console) as shown:
        shown.advance(10, epoch="3/3")
    text = stream.getvalue()
    assert "\x1b[" in text and "done," not in text, "plain lines on a terminal"
    final = text.rsplit("\x1b[2K", 1)[-1]  # what stays after the last line erase: empty if transient
    assert "features" in final and "10/10" in final and "epoch 3/3" in final, repr(final)


def test_an_evaluation_bar_nests_under_the_running_training_bar(tmp_path):
    """Periodic evaluation starts its bars while the training bar is live (rich >= 14.1
    nests them; older versions raise LiveError)."""
    from gan_dist.console import Console as TrainingConsole

    training = TrainingConsole(True, total_images=1000, run_dir=tmp_path, tty=True)
    training.rich = Console(file=io.StringIO(), force_terminal=True, width=120)
    training.start()
    try:
        with task_progress("eval: features", 4, "images", console=training.rich) as shown:
            shown.advance(4)
        training.advance(500, 10)
        assert training.progress is not None and training.progress.live.is_started
    finally:
        training.close()
    assert "eval: features" in training.rich.file.getvalue()


@pytest.mark.parametrize("workers", [1, 2])
def test_prepare_without_a_tty_prints_sample_counts(tmp_path, workers):
    result = subprocess.run([sys.executable, "-m", "gan_dist.cli", "prepare", "digits", "--out", str(tmp_path / "d"),
                             "--workers", str(workers)], capture_output=True, text=True, cwd=ROOT, check=False)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "prepare: started, 1797 samples"
    assert lines[-2].startswith("prepare: done, 1797/1797 samples in ")
    assert lines[-1].startswith("wrote 1797 samples")


class _Recorder:
    """Stands in for task_progress: records every advance."""

    def __init__(self):
        self.advances = []

    @contextlib.contextmanager
    def __call__(self, description, total, unit="items", **kwargs):
        self.total = total
        yield self

    def advance(self, n=1, **fields):
        self.advances.append(n)


class _SlowSource:
    """An in-memory source that takes 2 ms a sample, so that a shard takes about a second."""

    def __init__(self, count):
        self.samples, self.classes, self.description = np.zeros((count, 1, 4, 4), np.uint8), [], "slow"
        self.shape, self.dtype = (1, 4, 4), "uint8"

    def __len__(self):
        return len(self.samples)

    def load(self, i):
        time.sleep(0.002)
        return self.samples[i], 0

    def name_of(self, i):
        return f"sample {i}"


def test_prepare_advances_within_a_shard_with_and_without_workers(tmp_path, monkeypatch):
    from gan_dist.data import prepare
    from gan_dist.data.sources import digits

    recorder = _Recorder()
    monkeypatch.setattr(prepare, "task_progress", recorder)
    prepare.write_shards(digits(), tmp_path / "serial", shard_size=300, limit=300)
    assert recorder.total == 300
    assert recorder.advances == [64, 64, 64, 64, 44], "one shard of 300: reported 64 samples at a time"

    # With workers, results come back a whole shard at a time; the counter is polled in between.
    monkeypatch.setattr(prepare, "POLL_S", 0.02)
    recorder.advances = []
    prepare.write_shards(_SlowSource(400), tmp_path / "pool", workers=2, shard_size=400)
    assert sum(recorder.advances) == 400
    assert len([n for n in recorder.advances if n]) >= 3, f"shard granularity only: {recorder.advances}"


def _digit_tensors(count: int):
    from gan_dist.data.sources import digits

    source = digits()
    return torch.from_numpy(source.samples[:count]), torch.from_numpy(source.labels[:count]).long()


def test_classifier_training_prints_steps_epochs_loss_and_accuracy(monkeypatch, capsys):
    from gan_dist.eval import classifier

    monkeypatch.setattr(classifier, "EPOCHS", 3)
    monkeypatch.setattr(classifier, "MIN_STEPS", 1)
    samples, labels = _digit_tensors(200)  # two steps per epoch (BATCH 128)
    classifier.train_classifier(samples, labels, 10)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "cls: training the classifier: started, 6 steps"
    assert lines[-1].startswith("cls: training the classifier: done, 6/6 steps in ")
    assert ", epoch 3/3, loss " in lines[-1] and ", train_accuracy " in lines[-1]

    # A line per step (no rate limit): the epoch from its first step, its loss once it ended.
    every_step = functools.partial(task_progress, "cls", tty=False, heartbeat_s=0, min_gap_s=0)
    classifier.train_classifier(samples, labels, 10, progress=every_step)
    middle = capsys.readouterr().out.splitlines()[1:-1]
    assert len(middle) == 5  # steps 1 to 5: the last one is the closing line
    assert middle[0].startswith("cls: 1/6 steps (17%), ") and middle[0].endswith(", epoch 1/3")
    assert ", epoch 2/3, loss " in middle[2] and "train_accuracy" in middle[2]


def test_evaluation_shows_its_steps_on_rank_0_only(digits_dir, tmp_path, capsys):
    from accelerate import Accelerator
    from tiny_extractor import TinyExtractor

    from gan_dist.config import ModelConfig
    from gan_dist.data.stream import open_dataset
    from gan_dist.eval.run import EvalOptions, Target, _progress_on_rank0, evaluate
    from gan_dist.models import build_models

    data = open_dataset(str(digits_dir))
    G, _ = build_models(ModelConfig(name="mlp", width_mult=0.125, latent_dim=16), data.shape, 0)
    opts = EvalOptions(metrics=["fid"], num=200, batch=64, cache_dir=str(tmp_path))
    target = Target(G.eval(), 16, 0, data, "digits")
    evaluate(target, opts, Accelerator(cpu=True), {"inception": TinyExtractor()})
    out = capsys.readouterr().out
    assert "eval: Inception features of generated samples: started, 200 samples" in out
    assert f"eval: Inception features of the real samples (all {data.count}): done, {data.count}/{data.count}" in out
    evaluate(target, opts, Accelerator(cpu=True), {"inception": TinyExtractor()})
    assert "real samples" not in capsys.readouterr().out, "a cached reference is not extracted again"

    for rank in (0, 1):
        with _progress_on_rank0((rank, 2, "cpu"), None)("x")(5, "items") as shown:
            shown.advance(5)
        out = capsys.readouterr().out
        assert out.startswith("x (rank 0's part of 2): started, 5 items\n") if rank == 0 else out == ""


def test_eval_json_keeps_stdout_for_the_json_and_shows_the_cls_steps_on_stderr(digits_dir, tmp_path, monkeypatch,
                                                                                 capsys):
    from gan_dist.cli import main
    from gan_dist.config import ModelConfig
    from gan_dist.data.stream import open_dataset
    from gan_dist.eval import classifier
    from gan_dist.eval import cli as eval_cli
    from gan_dist.eval.run import Target
    from gan_dist.models import build_models

    monkeypatch.setattr(classifier, "EPOCHS", 1)
    monkeypatch.setattr(classifier, "MIN_STEPS", 2)
    data = open_dataset(str(digits_dir))
    G, _ = build_models(ModelConfig(name="mlp", width_mult=0.125, latent_dim=16), data.shape, 0)
    monkeypatch.setattr(eval_cli, "load_target", lambda *args: (Target(G.eval(), 16, 0, data, "digits"), 7))
    assert main(["eval", "--run", str(tmp_path / "run"), "--metrics", "cls", "--num", "100", "--json",
                 "--cache-dir", str(tmp_path / "cache")]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["results"]["cls"]["num"] == 100
    for step in ("cls: reading the classifier's samples", "cls: training the classifier (once per dataset): done",
                 "cls: classifier features of generated samples", "cls: classifier features of the real held-out part"):
        assert step in err
