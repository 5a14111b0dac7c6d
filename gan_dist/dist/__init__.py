"""Everything that knows about the launcher, accelerate, DDP and DeepSpeed lives in this package:
this module holds the launch checks and what keeps ranks together; ddp.py and zero.py hold
the two backends that own G's and D's gradients and optimizer steps (`build_backend`).

Three silent failures this module turns into errors or fixes (see docs/training.md):
- torchrun / `accelerate launch --multi_gpu` on a machine without CUDA starts independent
  one-process runs unless CPU mode is requested: we request it whenever there is no CUDA,
  and check afterwards that accelerate sees the launcher's world size;
- accelerate reads precision and gradient accumulation from its launch config, and divides
  losses by its own accumulation count: our config owns those, so a contradiction exits 2;
- G's loss must not leave gradients in D: D is frozen whole during the G phase.

It also holds what keeps ranks together afterwards: the BatchNorm buffer sync, the
bit-exact rank consistency check, SyncBatchNorm conversion, and where stack dumps go.
"""

from __future__ import annotations

import datetime
import io
import itertools
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from gan_dist.errors import UserError

# accelerate settings that our config owns: env variable -> (our key, value meaning "unset").
OWNED_BY_CONFIG = {
    "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": ("train.num_micro_batches", "1"),
    "ACCELERATE_USE_DEEPSPEED": ("train.backend", "false"),
    "ACCELERATE_USE_FSDP": ("train.backend", "false"),
    "ACCELERATE_USE_MEGATRON_LM": ("train.backend", "false"),
    "ACCELERATE_DYNAMO_BACKEND": ("train.compile (not available yet)", "no"),
}


def build_backend(cfg, accelerator, G: nn.Module, D: nn.Module, opt_G, opt_D, batch_per_device: int):
    """The object that owns G's and D's forward modules, backward passes and optimizer steps:
    accelerate's DDP (train.backend=ddp) or one DeepSpeed engine per network (deepspeed)."""
    if cfg.train.backend == "deepspeed":
        from gan_dist.dist.zero import DeepSpeedBackend

        return DeepSpeedBackend(cfg, accelerator, G, D, opt_G, opt_D, batch_per_device)
    from gan_dist.dist.ddp import DDPBackend

    return DDPBackend(accelerator, G, D, opt_G, opt_D, compile_forward=cfg.train.compile)


def configure_gpu_math(tf32: bool) -> None:
    """train.tf32: TF32 tensor cores for float32 matmuls and convolutions (Ampere and newer).
    PyTorch leaves matmuls at full fp32 by default; GAN training is insensitive to the
    difference, and float32 runs on such GPUs are several times faster with it."""
    if _cuda_available():
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _cuda_available() -> bool:
    return torch.cuda.is_available()


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
                      backend: str = "ddp"):
    """One Accelerator for G and D, really distributed whenever the launcher started several processes.

    Under train.backend=deepspeed it only sets up the processes and collectives: the engines own
    precision, so accelerate runs in fp32 and never wraps the networks."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

    check_launch_env(mixed_precision)
    if backend == "deepspeed":  # a missing package fails here, before the run directory is touched
        from gan_dist.dist.zero import import_deepspeed

        import_deepspeed()
    # Without CUDA, accelerate must be told CPU mode or a multi-process launch runs undistributed.
    cpu = not _cuda_available()
    if mixed_precision == "fp16" and cpu:
        raise UserError("train.mixed_precision=fp16 needs a GPU (on CPU it would silently run in fp32); "
                        "use train.mixed_precision=bf16 or no")
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=mixed_precision if backend == "ddp" else "no",
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


def sync_buffers(accelerator, *modules: nn.Module) -> None:
    """Make BatchNorm statistics (and other buffers) identical on every rank: rank 0's.

    DDP broadcasts rank 0's buffers at the start of each forward, but every rank then updates
    them from its own batch, so after any step they differ. Rank 0's values are what DDP
    would use next; call this before anything reads buffers (grids, EMA copies, snapshots).
    """
    if accelerator.num_processes == 1:
        return
    import torch.distributed as torch_dist

    for module in modules:
        for buffer in module.buffers():
            torch_dist.broadcast(buffer.data, src=0)


def distributed_name(accelerator) -> str:
    """'NO', 'MULTI_CPU', 'MULTI_GPU', ... as accelerate calls the set-up."""
    return str(accelerator.distributed_type).split(".")[-1]


def configure_threads(num_threads: int, num_workers: int) -> None:
    """Pin torch's CPU threads: the config's number, or else the cores left per process after
    its loader workers (torch's default takes every core in every process and oversubscribes).
    An OMP_NUM_THREADS set by the user or the launcher (torchrun sets 1) is respected."""
    if num_threads:
        torch.set_num_threads(num_threads)
    elif "OMP_NUM_THREADS" not in os.environ and not _cuda_available():
        per_process = (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(max(1, per_process - num_workers))


class RankMismatchError(RuntimeError):
    """Ranks hold different weights: a bug (ours or a plugin's), never a user error."""


def _fingerprint(tensor: torch.Tensor) -> torch.Tensor:
    """Two int64 sums over the raw bits (plain and position-weighted): any change of any bit,
    or two swapped values, changes them. Exact integer arithmetic, so no tolerance is needed."""
    flat = tensor.detach().contiguous().reshape(-1)
    # Reading 4-byte words needs 4-byte alignment: a half-precision parameter inside DeepSpeed's
    # flat buffer can start at an odd element (found with InfoGAN's code head under bf16 ZeRO-2).
    if (flat.storage_offset() * flat.element_size()) % 4:
        flat = flat.clone()
    word = torch.int32 if flat.numel() * flat.element_size() % 4 == 0 else torch.uint8
    bits = flat.view(torch.uint8).view(word).to(torch.int64)
    weights = torch.arange(1, bits.numel() + 1, device=bits.device, dtype=torch.int64)
    return torch.stack([bits.sum(), (bits * weights).sum()])


def check_rank_consistency(accelerator, modules: dict[str, nn.Module]) -> None:
    """Every rank: raise naming the first parameter or buffer that is not bit-identical on all ranks.

    One all-gather of two integers per tensor; call it after `sync_buffers`.
    """
    if accelerator.num_processes == 1:
        return
    names, prints = [], []
    for module_name, module in modules.items():
        for name, tensor in itertools.chain(module.named_parameters(), module.named_buffers()):
            names.append(f"{module_name}.{name}")
            prints.append(_fingerprint(tensor))
    gathered = accelerator.gather(torch.stack(prints).unsqueeze(0)).view(accelerator.num_processes, len(names), 2)
    differs = (gathered != gathered[:1]).any(dim=2).any(dim=0)
    if bool(differs.any()):
        first = names[int(differs.nonzero()[0])]
        ranks = [r for r in range(accelerator.num_processes) if bool((gathered[r] != gathered[0]).any())]
        raise RankMismatchError(f"{first} differs between rank 0 and rank(s) {ranks}: the ranks no longer train "
                                "the same networks (a rank-dependent update, or buffers changed after the sync)")


def convert_sync_batchnorm(G: nn.Module, D: nn.Module) -> tuple[nn.Module, nn.Module]:
    """model.sync_bn: BatchNorm statistics over the global batch (NCCL only, so GPU only)."""
    if not _cuda_available():
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
