"""What a user sees: the console in plain mode and on a terminal, samples/latest.png, and
`gan-dist plot`."""

import json
import re

import pytest
from conftest import tiny_args

from gan_dist.console import Console, format_elapsed
from gan_dist.plot import PANELS, panel_series, plot_run, read_records

CHECKPOINT_DELAY_S = 0.5


def _records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_plain_console_names_grids_and_checkpoints_and_counts_elapsed_across_a_resume(
        train_main, digits_dir, tmp_path, monkeypatch):
    import gan_dist.trainer as trainer_mod

    save = trainer_mod.save_checkpoint

    def slow_save(trainer):  # training time the first leg spends, which the second must count on from
        import time

        time.sleep(CHECKPOINT_DELAY_S)
        return save(trainer)

    monkeypatch.setattr(trainer_mod, "save_checkpoint", slow_save)
    # batch 32: a grid and a checkpoint every 10 steps
    common = ("train.total_kimg=10", "log.every_steps=10", "log.sample_every_kimg=0.32", "checkpoint.every_kimg=0.32")
    code, out, err = train_main(*tiny_args(digits_dir, "train.max_steps=30", *common))
    assert code == 0, err
    run, printed_run = tmp_path / "runs" / "tiny", "runs/tiny"  # as the config names it
    for step in (10, 20, 30):
        assert f"sample grid {printed_run}/samples/step_{step:08d}.png (step {step}," in out
    for step in (10, 20):
        assert f"checkpoint {printed_run}/checkpoints/step_{step:08d} (step {step}," in out
    assert f"checkpoint {printed_run}/checkpoints/step_00000030 (step 30, 1.0 kimg, final)" in out
    assert (run / "samples" / "latest.png").read_bytes() == (run / "samples" / "final.png").read_bytes()
    assert f"gan-dist plot --run {printed_run}" in out
    assert "1 process on the CPU, not distributed" in out
    first_leg = _records(run)
    logged = {key for record in first_leg for key in record} - {"step", "kimg", "time_s"}
    unplotted = {key for key in logged if not any(claims(key) for _, claims in PANELS)}
    assert not unplotted, f"logged but drawn in no panel of gan-dist plot: {unplotted}"
    # The closing block comes last: nothing of the run is printed after it.
    assert out.rstrip().splitlines()[-5].startswith("done: 30 steps")

    monkeypatch.setattr(trainer_mod, "save_checkpoint", save)
    # A killed leg's record past the checkpoint: the resume moves it aside.
    with open(run / "metrics.jsonl", "a") as metrics:
        metrics.write(json.dumps({**first_leg[-1], "step": 35, "kimg": 1.12}) + "\n")
    bar_starts = []
    monkeypatch.setattr(Console, "start", lambda self, *args: bar_starts.append(args))
    checkpoint_elapsed_s = json.loads((run / "checkpoints" / "step_00000030" / "state.json").read_text())["elapsed_s"]
    code, out, err = train_main(*tiny_args(digits_dir, "train.max_steps=50", *common))
    assert code == 0, err
    assert bar_starts == [(30 * 32, 30, pytest.approx(checkpoint_elapsed_s, abs=1e-6))]
    second_leg = _records(run)[len(first_leg):]
    assert [r["step"] for r in second_leg] == [40, 50]
    assert [json.loads(line)["step"] for line in (run / "metrics.undone.jsonl").read_text().splitlines()] == [35]
    assert checkpoint_elapsed_s >= 3 * CHECKPOINT_DELAY_S
    assert second_leg[0]["time_s"] > checkpoint_elapsed_s, "elapsed restarted on resume"
    printed = re.findall(r"^step (\d+) .* elapsed (\S+)", out, re.MULTILINE)
    assert printed == [(str(r["step"]), format_elapsed(r["time_s"])) for r in second_leg]
    assert (run / "samples" / "latest.png").read_bytes() == (run / "samples" / "final.png").read_bytes()


def test_model_json_of_an_unconditional_run_records_no_classes(train_main, digits_dir, tmp_path):
    code, _, err = train_main(*tiny_args(digits_dir, "train.max_steps=2"))
    assert code == 0, err
    checkpoint = tmp_path / "runs" / "tiny" / "checkpoints" / "step_00000002"
    assert json.loads((checkpoint / "model.json").read_text())["num_classes"] == 0  # the digits have 10


def test_the_bar_is_live_from_host_counters_and_marks_the_losses_stale(tmp_path):
    console = Console(True, total_images=100_000, run_dir=tmp_path, tty=True)
    console.start(num_images=40_000, step=1250, elapsed_before_s=3600.0)  # a resume at 40 kimg, after an hour
    try:
        console.advance(num_images=41_600, step=1300)
        task = console.progress.tasks[0]
        columns = {type(c).__name__: c for c in console.progress.columns}
        assert task.fields["kimg"] == "41.6" and task.fields["step"] == 1300
        assert columns["_ElapsedColumn"].render(task).plain.startswith("1:00:")
        console.log({"step": 1300, "kimg": 41.6, "time_s": 3601.0, "Loss/D": 1.25, "Loss/G": 0.5,
                     "Speed/img_per_s": 100.0})
        assert (task.fields["loss_d"], task.fields["loss_g"], task.fields["log_step"]) == ("1.25", "0.5", 1300)
        console.advance(num_images=43_200, step=1350)
        assert task.fields["log_step"] == 1300 and task.fields["step"] == 1350  # losses say how old they are
        console.finish(["done"])
        assert console.progress is None  # the bar stopped before the closing lines
    finally:
        console.close()


def test_the_bar_fits_an_80_column_terminal(tmp_path):
    import io

    from rich.console import Console as RichConsole

    console = Console(True, total_images=640_000, run_dir=tmp_path, tty=True)
    console.rich = RichConsole(file=io.StringIO(), force_terminal=True, width=80)
    console.start(num_images=320_000, step=5000, elapsed_before_s=40.0)
    try:
        console.log({"step": 9500, "kimg": 608.0, "time_s": 70.0, "Loss/D": -1.2345, "Loss/G": 12.345,
                     "Speed/img_per_s": 8455.0})
        console.advance(num_images=639_936, step=9999)
        progress = console.progress
    finally:
        console.close()
    terminal = RichConsole(file=io.StringIO(), width=80, color_system=None)
    terminal.print(progress.make_tasks_table(progress.tasks))
    lines = terminal.file.getvalue().splitlines()
    assert len(lines) == 1, lines  # nothing wrapped
    for shown in ("step 9999", "639.9 kimg", "D -1.23 G 12.3", "@9500", "0:00:", "ETA"):
        assert shown in lines[0], (shown, lines[0])


def test_format_elapsed_counts_hours_past_a_day():
    assert format_elapsed(0) == "0:00:00"
    assert format_elapsed(3723.9) == "1:02:03"
    assert format_elapsed(30 * 3600 + 61) == "30:01:01"


def _write_metrics(path, num_records, eval_steps=()):
    lines = []
    for i in range(1, num_records + 1):
        lines.append({"step": 10 * i, "kimg": 0.32 * i, "time_s": float(i), "Loss/D": 1.0 + i, "Loss/G": 2.0 - i,
                      "Loss/D/r1": 0.1, "Logits/real": 0.5, "Logits/fake": -0.5, "GradNorm/D": 3.0,
                      "GradNorm/G": 2.0, "Speed/img_per_s": 100.0 + i, "Speed/data_wait_fraction": 0.1,
                      "Skipped/G": 0, "Skipped/D": i // 3, "Rollbacks": 0})
        if 10 * i in eval_steps:
            lines.append({"step": 10 * i, "kimg": 0.32 * i, "Eval/fid": 50.0 / i, "Eval/kid": 0.01})
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


@pytest.mark.parametrize("eval_steps", [(), (20, 40)])
def test_plot_draws_one_panel_per_series_family_with_every_record(tmp_path, eval_steps):
    import matplotlib.pyplot as plt

    _write_metrics(tmp_path / "metrics.jsonl", 5, eval_steps)
    path, figure = plot_run(tmp_path)
    try:
        titles = [ax.get_title() for ax in figure.axes]
        expected = ["losses", "D logits (mean)", "gradient norms", "img/s",
                    "data (wait fraction, failures, bad samples, MiB read)", "skipped steps (total)"]
        assert titles == expected + (["evaluation"] if eval_steps else [])
        for ax in figure.axes:
            for line in ax.get_lines():
                assert len(line.get_xdata()) == (len(eval_steps) if ax.get_title() == "evaluation" else 5), \
                    (ax.get_title(), line.get_label())
        lines = {line.get_label() for ax in figure.axes for line in ax.get_lines()}
        assert {"Loss/D", "Loss/D/r1", "Skipped/D", "Rollbacks"} <= lines
        assert path == tmp_path / "plot.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        plt.close(figure)


def test_plot_keeps_the_resumed_legs_records_and_skips_a_cut_last_line(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    _write_metrics(metrics, 5)  # steps 10..50; the run resumed from its step-30 checkpoint
    resumed = [{"step": s, "kimg": s * 0.032, "Loss/D": -1.0} for s in (40, 50, 60)]
    metrics.write_text(metrics.read_text() + "".join(json.dumps(r) + "\n" for r in resumed) + '{"step": 7')
    records = read_records(metrics)
    assert [r["step"] for r in records] == [10, 20, 30, 40, 50, 60]
    assert [r["Loss/D"] for r in records[3:]] == [-1.0, -1.0, -1.0]
    series = dict(panel_series(records))
    assert len(series["losses"]["Loss/D"][1]) == 6 and len(series["losses"]["Loss/G"][1]) == 3


def test_plot_of_a_directory_without_metrics_exits_2(tmp_path, capsys):
    from gan_dist.cli import main

    assert main(["plot", "--run", str(tmp_path / "nope")]) == 2
    assert "metrics.jsonl does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("num_processes, per_node, device, expected", [
    (1, 1, "cpu", "1 process on the CPU, not distributed"),
    (1, 1, "cuda", "1 process on one CUDA GPU, not distributed"),
    (2, 2, "cpu", "2 processes on the CPU, data parallel over ?"),
    (16, 8, "cuda", "16 processes on 2 nodes, one CUDA GPU each, data parallel over ?"),
])
def test_the_run_summary_names_processes_and_devices_in_plain_words(monkeypatch, num_processes, per_node, device,
                                                                      expected):
    from types import SimpleNamespace

    import torch

    from gan_dist.parallel import describe_processes

    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(per_node))
    accelerator = SimpleNamespace(num_processes=num_processes, device=torch.device(device))
    assert describe_processes(accelerator) == expected
