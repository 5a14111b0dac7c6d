"""`python train.py` / `gan-dist train`: the one place that wires config, data, models and
the accelerator together, then hands them to the Trainer.

    python train.py --config configs/default.yaml train.total_kimg=2 optim.discriminator.lr=4e-4
    torchrun --nproc_per_node 2 train.py --config configs/tiny.yaml run.name=tiny-torchrun
    accelerate launch --config_file launch/accelerate/cpu-2proc.yaml train.py --config configs/tiny.yaml
    python train.py --debug --config configs/default.yaml
"""

from __future__ import annotations

import argparse
import faulthandler
import importlib
import shutil
import signal
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from gan_dist import config as config_mod
from gan_dist import parallel
from gan_dist.errors import UserError, run_reporting_errors
from gan_dist.preempt import StopRequest, clear_requeue_marker

DEBUG_MAX_STEPS = 20


def build_parser(prog: str = "train.py") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a GAN. Config = schema defaults <- --config YAML (default: the quickstart's "
                    "configs/default.yaml) <- key=value overrides.",
        epilog="config keys (override as key=value):\n" + "\n".join(config_mod.help_lines()))
    parser.add_argument("--config", default=str(config_mod.DEFAULT_CONFIG),
                        help="YAML run config (default: the quickstart's, configs/default.yaml)")
    parser.add_argument("--debug", action="store_true",
                        help=f"one process, {DEBUG_MAX_STEPS} steps, no workers, anomaly detection, tracebacks")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    return parser


def main(argv: list[str] | None = None, prog: str = "train.py") -> int:
    args = build_parser(prog).parse_args(argv)
    # Stop signals are caught from the start: one that arrives while the run starts up (a
    # preemption warning during imports or data preparation) stops it at its first check,
    # with a checkpoint, instead of killing the process with SIGUSR1's default action.
    with StopRequest() as stop_request:
        return run_reporting_errors(lambda: train(args.config, args.overrides, args.debug, stop_request),
                                    args.debug)


def apply_debug_mode(cfg) -> None:
    """--debug: the given config, shortened, in one process, with every check switched on."""
    if parallel.env_world_size() > 1:
        raise UserError(f"--debug runs one process, but the launcher started WORLD_SIZE={parallel.env_world_size()}; "
                        "run it as plain `python train.py --debug ...`")
    cfg.train.max_steps = min(cfg.train.max_steps or DEBUG_MAX_STEPS, DEBUG_MAX_STEPS)
    cfg.data.num_workers = 0
    cfg.log.every_steps = 1
    cfg.run.name += "-debug"
    cfg.run.overwrite = True
    torch.autograd.set_detect_anomaly(True)
    torch.use_deterministic_algorithms(True, warn_only=True)


def import_plugins(names: list[str]) -> None:
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise UserError(f"config key 'plugins': cannot import '{name}' ({err}); "
                            "put the module on PYTHONPATH or fix its name") from err


@dataclass
class ResumePlan:
    """Rank 0's reading of the run directory, the same on every rank (broadcast)."""

    checkpoint: Path | None = None
    state: dict | None = None
    new_run_dir: bool = True
    """Write config.yaml and run.json (a fresh run, or a resume into a directory without them)."""
    complete: str = ""
    """Set when the checkpoint already reached train.total_kimg / max_steps: the one line to print."""


def plan_resume(cfg, run_dir: Path) -> ResumePlan:
    """What to do with run_dir: start afresh (checked first), resume (compatibility checked), or
    nothing, because the run is complete. Rank 0 only: the others get its answer."""
    from gan_dist import resume
    from gan_dist.run import RUN_MARKER, check_run_dir

    checkpoint = None if cfg.run.overwrite else resume.find_checkpoint(run_dir, cfg.train.resume)
    if checkpoint is None:
        check_run_dir(run_dir, cfg.run.overwrite)
        return ResumePlan()
    state = resume.read_state(checkpoint)
    resume.check_compatible(checkpoint, state["config"], config_mod.to_dict(cfg))
    return ResumePlan(checkpoint, state, new_run_dir=not (run_dir / RUN_MARKER).is_file(),
                      complete=_completion(cfg, run_dir, checkpoint, state))


def _completion(cfg, run_dir: Path, checkpoint: Path, state: dict) -> str:
    from gan_dist import resume

    step = state["progress"]["step"]
    kimg = state["progress"]["num_d_steps"] * cfg.train.batch_size / 1000
    reached = kimg >= cfg.train.total_kimg or (cfg.train.max_steps and step >= cfg.train.max_steps)
    if not reached or not resume.is_finished(checkpoint):
        return ""
    return (f"{run_dir} is complete: {kimg:g} kimg in {step} steps (train.total_kimg={cfg.train.total_kimg:g}), "
            f"final grid {run_dir / 'samples' / 'final.png'}; raise train.total_kimg to train on, or pass "
            "run.overwrite=true to train it again")


def _start(cfg, debug: bool):
    """Device, threads and the accelerator, then rank 0's plan for the run directory."""
    device = parallel.resolve_device(cfg.train.device)
    parallel.configure_threads(cfg.train.num_threads, device)
    parallel.configure_gpu_math(device, cfg.train.tf32, benchmark=not debug)
    run_dir = Path(cfg.run.root) / cfg.run.name
    # `kill -USR2 PID` prints where a rank is (USR1 and TERM ask for a checkpoint and a stop).
    faulthandler.register(signal.SIGUSR2, file=parallel.stack_dump_file(), all_threads=True)
    # The step watchdog (dist.timeout_s) fires first, so a hang shows every rank's stacks.
    acc = parallel.build_accelerator(cfg.train.mixed_precision, run_dir, cfg.log.tensorboard,
                                     timeout_s=cfg.dist.timeout_s * 1.1 + 60, backend=cfg.train.backend,
                                     device=device)
    # Decided once: another node's stale view of `latest` must not send its ranks elsewhere.
    plan = parallel.decided_on_rank0(acc, lambda: plan_resume(cfg, run_dir))
    return acc, run_dir, plan


def _build_networks(cfg, acc, info, per_device: int):
    from gan_dist.models import build_models
    from gan_dist.run import build_optimizers

    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    G, D = build_models(cfg.model, info.shape, info.num_classes)
    parallel.check_sync_bn(cfg, D)
    if cfg.model.sync_bn:
        G, D = parallel.convert_sync_batchnorm(G, D, acc.device.type)
    if cfg.train.channels_last:  # conv weights; the trainer converts the images to match
        G, D = G.to(memory_format=torch.channels_last), D.to(memory_format=torch.channels_last)
    return parallel.build_backend(cfg, acc, G, D, *build_optimizers(cfg, G, D), per_device)


def _open_data(cfg, acc, info, plan: ResumePlan, per_device: int, run_dir: Path):
    """(read mode, why, this rank's loader, its failure log) for a new run or a resume."""
    from gan_dist import resume
    from gan_dist.run import open_loader, read_mode

    checkpoint, state = plan.checkpoint, plan.state
    if checkpoint is not None:
        parallel.decided_on_rank0(acc, lambda: resume.check_data_matches(checkpoint, info))
    previous = None  # the checkpoint's mode, kept under auto when switching would be the only layout change
    if checkpoint is not None:
        as_before = resume.layout(acc.num_processes, cfg.data.num_workers, acc.device.type, info.identity()["sha256"],
                                  state.get("data_mode", resume.RECORDED_SINCE["data_mode"]))
        previous = as_before["data_mode"] if resume.same_layout(state, as_before) else None
    mode, reading = read_mode(cfg, acc, info, previous)
    now = resume.layout(acc.num_processes, cfg.data.num_workers, acc.device.type, info.identity()["sha256"],
                        resume.data_mode(mode))
    start = resume.stream_start(checkpoint, state, acc.process_index, now) if checkpoint else None
    # Storage failures each loader worker meets, one directory per leg of the run (the leg
    # after a resume replays the earlier legs' failures from the checkpoint instead).
    failure_log = run_dir / ".stream" / f"from-step-{state['progress']['step'] if checkpoint else 0}"
    return mode, reading, open_loader(cfg, acc, info, per_device, mode, start, str(failure_log)), failure_log


def train(config_path: str | None, overrides: list[str], debug: bool = False,
          stop_request: StopRequest | None = None) -> int:
    from gan_dist import resume
    from gan_dist.console import Console
    from gan_dist.ema import EMA
    from gan_dist.losses import get_loss
    from gan_dist.run import data_warnings, describe_run, open_info, prepare_run_dir
    from gan_dist.trainer import Trainer

    cfg = config_mod.load_config(config_path, overrides)
    if debug:
        apply_debug_mode(cfg)
    import_plugins(cfg.plugins)
    acc, run_dir, plan = _start(cfg, debug)
    if plan.complete:
        if acc.is_main_process:
            print(plan.complete, flush=True)
        return 0
    per_device = parallel.batch_per_device(cfg.train.batch_size, acc.num_processes, cfg.train.num_micro_batches)
    checkpoint, state = plan.checkpoint, plan.state
    info = open_info(cfg, acc)
    mode, reading, loader, failure_log = _open_data(cfg, acc, info, plan, per_device, run_dir)
    loss = get_loss(cfg.loss.name)
    backend = _build_networks(cfg, acc, info, per_device)
    # Only now, with config, data, models and engines known to be good, is the run directory touched.
    if plan.new_run_dir:
        prepare_run_dir(run_dir, cfg, acc)
    ema = EMA(backend.raw["G"], cfg.train.ema_half_life_kimg, cfg.train.ema_rampup)
    console = Console(acc.is_main_process, int(cfg.train.total_kimg * 1000), run_dir, acc)
    console.summary(f"gan_dist run '{cfg.run.name}'", describe_run(cfg, acc, info, backend, per_device, reading))
    if acc.is_main_process:  # reading the first shard for the class check is rank 0's alone
        warnings = data_warnings(info, acc.num_processes * max(1, cfg.data.num_workers)) if mode == "off" else []
        for warning in warnings:
            console.warn(warning)
    if debug:
        console.print(f"G: {backend.raw['G']}\nD: {backend.raw['D']}")
    if cfg.log.tensorboard:
        acc.init_trackers("tensorboard", config=config_mod.flat_dict(cfg))
    trainer = Trainer(cfg, acc, backend, ema, loss, loader, info, console, run_dir, debug)
    if checkpoint is not None:
        resume.restore(trainer, checkpoint, state)
        console.forget_records_after(trainer.progress.step)
        console.print(f"resumed from {checkpoint} at step {trainer.progress.step} "
                      f"({trainer.num_images / 1000:.1f} kimg)")
    if acc.is_main_process:
        clear_requeue_marker(run_dir)
        # An earlier attempt from the same checkpoint left its failures here; this one reads anew.
        shutil.rmtree(failure_log, ignore_errors=True)
    acc.wait_for_everyone()  # before any loader worker starts (they start with fit)
    with (StopRequest() if stop_request is None else nullcontext(stop_request)) as trainer.stop_request:
        trainer.fit()
    acc.end_training()
    return 0
