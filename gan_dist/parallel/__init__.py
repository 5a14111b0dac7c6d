"""Everything that knows about the launcher, accelerate, DDP and DeepSpeed lives in this package:
this module holds the launch checks; device.py which device a process uses; ranks.py what
keeps ranks together (decisions taken once, votes, buffer sync, the consistency check);
ddp.py and zero.py the two backends that own G's and D's precision, gradients and optimizer
steps (`build_backend`).

Silent failures this module turns into errors or fixes (see docs/training.md):
- torchrun / `accelerate launch --multi_gpu` on a machine without CUDA starts independent
  one-process runs unless CPU mode is requested: we request it whenever the process trains
  on the CPU, and check afterwards that accelerate sees the launcher's world size;
- accelerate reads precision and gradient accumulation from its launch config, and divides
  losses by its own accumulation count: our config owns those, so a contradiction exits 2;
- G's loss must not leave gradients in D: D is frozen whole during the G phase;
- SyncBatchNorm has no double backward, so it cannot sit in a D that R1 or the gradient
  penalty differentiates twice (with one process it falls back to BatchNorm, so only a
  multi-GPU run would find out): that combination exits 2 before anything starts
  (`check_sync_bn`; we refuse rather than convert only G, which would silently give D
  per-rank statistics under a setting that promises global ones).
"""

from __future__ import annotations

import datetime
import io
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from gan_dist.errors import UserError
from gan_dist.parallel.device import configure_gpu_math, configure_threads, resolve_device  # noqa: F401
from gan_dist.parallel.ranks import (  # noqa: F401
    RankMismatchError,
    RankVote,
    broadcast_from_rank0,
    check_rank_consistency,
    decided_on_rank0,
    sum_over_ranks,
    sync_buffers,
)

# accelerate settings that our config owns: env variable -> (our key, value meaning "unset").
OWNED_BY_CONFIG = {
    "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": ("train.num_micro_batches", "1"),
    "ACCELERATE_USE_DEEPSPEED": ("train.backend", "false"),
    "ACCELERATE_USE_FSDP": ("train.backend", "false"),
    "ACCELERATE_USE_MEGATRON_LM": ("train.backend", "false"),
    "ACCELERATE_DYNAMO_BACKEND": ("train.compile", "no"),
}


def build_backend(cfg, accelerator, G: nn.Module, D: nn.Module, opt_G, opt_D, batch_per_device: int):
    """The object that owns G's and D's forward modules, backward passes and optimizer steps:
    accelerate's DDP (train.backend=ddp) or one DeepSpeed engine per network (deepspeed)."""
    if cfg.train.backend == "deepspeed":
        from gan_dist.parallel.zero import DeepSpeedBackend

        return DeepSpeedBackend(cfg, accelerator, G, D, opt_G, opt_D, batch_per_device)
    from gan_dist.parallel.ddp import DDPBackend

    return DDPBackend(accelerator, G, D, opt_G, opt_D, precision=cfg.train.mixed_precision,
                      compile_forward=cfg.train.compile)


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_launch_env(mixed_precision: str) -> None:
    """Refuse accelerate launch settings that contradict our config (accelerate would win)."""
    for var, (key, unset) in OWNED_BY_CONFIG.items():
        value = os.environ.get(var)
        if value is not None and value.strip().lower() not in (unset, ""):
            raise UserError(f"the launcher sets {var}={value}, but gan_dist's config owns this ({key}); "
                            "remove it from your accelerate config and set the gan_dist key instead")
    launcher_precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if launcher_precision not in ("no", mixed_precision):
        raise UserError(f"the accelerate launch config asks for mixed_precision={launcher_precision} but "
                        f"train.mixed_precision={mixed_precision}; set train.mixed_precision={launcher_precision} "
                        "and leave the launch config at 'no'")
    if env_world_size() > 1 and not all(k in os.environ for k in ("RANK", "MASTER_ADDR")):
        raise UserError(f"WORLD_SIZE={env_world_size()} is set but RANK/MASTER_ADDR are not; start "
                        "several processes with torchrun or accelerate launch, or unset WORLD_SIZE")


def build_accelerator(mixed_precision: str, run_dir, tensorboard: bool, timeout_s: float = 1800,
                      backend: str = "ddp", device: str = "auto"):
    """One Accelerator for G and D, really distributed whenever the launcher started several processes.

    It sets up the processes, devices and collectives only, always in fp32: the backend owns
    precision (ddp.py: autocast and one grad scaler per network; zero.py: the engines'), since
    accelerate keeps one scaler for both networks and ignores fp16 on a CPU."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

    check_launch_env(mixed_precision)
    device = resolve_device(device) if device == "auto" else device
    if backend == "deepspeed":  # a missing package fails here, before the run directory is touched
        from gan_dist.parallel.zero import import_deepspeed

        if mixed_precision == "fp16" and device == "cpu":
            raise UserError("train.mixed_precision=fp16 under train.backend=deepspeed needs a GPU (DeepSpeed's "
                            "CPU accelerator has no fp16 engine); use bf16, or train.backend=ddp")
        import_deepspeed(device)
    # Without CUDA, accelerate must be told CPU mode or a multi-process launch runs undistributed.
    accelerator = Accelerator(
        cpu=device == "cpu",
        mixed_precision="no",
        gradient_accumulation_steps=1,
        log_with="tensorboard" if tensorboard else None,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir)),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=timeout_s))],
    )
    check_world_size(accelerator.num_processes)
    return accelerator


def check_world_size(num_processes: int) -> None:
    launched = env_world_size()
    if num_processes != launched:
        raise UserError(f"the launcher started WORLD_SIZE={launched} processes but accelerate sees "
                        f"{num_processes}: each process would train alone on the same data. Launch with "
                        "torchrun or accelerate launch (launch/accelerate/*.yaml), which set RANK, LOCAL_RANK "
                        "and MASTER_ADDR for every process")


def batch_per_device(batch_size: int, num_processes: int, num_micro_batches: int) -> int:
    """train.batch_size is global; each process gets an equal share, split into micro-batches."""
    if batch_size % (num_processes * num_micro_batches):
        raise UserError(f"train.batch_size={batch_size} is not divisible by {num_processes} processes x "
                        f"{num_micro_batches} micro-batches; choose a multiple of {num_processes * num_micro_batches}")
    return batch_size // num_processes


@contextmanager
def frozen(parameters: list[nn.Parameter]) -> Iterator[None]:
    """All trainable parameters of a network stop collecting gradients.

    Pass every trainable parameter of the network: freezing only part of a DDP module breaks
    its reducer ("Expected to have finished reduction in the prior iteration").
    """
    for p in parameters:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in parameters:
            p.requires_grad_(True)


def distributed_name(accelerator) -> str:
    """'NO', 'MULTI_CPU', 'MULTI_GPU', ... as accelerate calls the set-up."""
    return str(accelerator.distributed_type).split(".")[-1]


def describe_processes(accelerator) -> str:
    """The run's processes and devices in plain words (run.json keeps accelerate's name)."""
    n, device = accelerator.num_processes, accelerator.device
    if n == 1:
        return f"1 process on {'the CPU' if device.type == 'cpu' else f'one {device.type.upper()} GPU'}, not distributed"
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", n) or n)
    nodes = f" on {n // per_node} nodes" if n > per_node else ""
    where = " on the CPU" if device.type == "cpu" else f", one {device.type.upper()} GPU each"
    backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else "?"
    return f"{n} processes{nodes}{where}, data parallel over {backend}"


def check_sync_bn(cfg, D: nn.Module) -> None:
    """model.sync_bn with a penalty that differentiates D twice (R1, the gradient penalty) and
    BatchNorm in D: SyncBatchNorm's backward has no double backward, and with one process it
    falls back to plain BatchNorm, so a one-GPU test run would pass and the 8-GPU job crash
    at its first penalty step. Refused on any device, before anything is built on it."""
    penalties = [f"loss.{key}={getattr(cfg.loss, key):g}" for key in ("r1_gamma", "gp_weight") if getattr(cfg.loss, key)]
    d_batchnorm = [name for name, m in D.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if cfg.model.sync_bn and d_batchnorm and penalties:
        raise UserError(f"model.sync_bn=true with BatchNorm in D ({d_batchnorm[0]}) and {' and '.join(penalties)}: "
                        "SyncBatchNorm has no double backward, which the penalty needs, so a multi-GPU run would "
                        "crash at the first penalty step. Set model.sync_bn=false, or a D without BatchNorm "
                        "(model.d_norm=spectral or none), or turn the penalty off")


def convert_sync_batchnorm(G: nn.Module, D: nn.Module, device: str) -> tuple[nn.Module, nn.Module]:
    """model.sync_bn: BatchNorm statistics over the global batch (NCCL only, so GPU only)."""
    if device != "cuda":
        raise UserError("model.sync_bn=true needs GPUs (SyncBatchNorm runs on NCCL only); "
                        "set model.sync_bn=false on CPU")
    convert = nn.SyncBatchNorm.convert_sync_batchnorm
    return convert(G), convert(D)


def stack_dump_file():
    """Where faulthandler writes stacks: stderr, or the process's own fd 2 when stderr is
    replaced by an object without a file descriptor (pytest's capture, notebooks)."""
    try:
        sys.stderr.fileno()
        return sys.stderr
    except (AttributeError, io.UnsupportedOperation, ValueError):
        return sys.__stderr__
