"""Which device a process trains on, decided before anything is built, and how it is tuned.

`train.device=auto` trains on CUDA when torch can use it. A GPU node whose CUDA install is
broken (a driver mismatch, a CPU-only torch wheel in the environment) makes
`torch.cuda.is_available()` return False without a word, and a naive `auto` would then
train a multi-GPU job on the node's CPUs, silently and hundreds of times slower. So when
the environment says GPUs were allocated to this process and CUDA is unusable, the run
stops with the reason instead; `train.device=cpu` trains on the CPU on purpose.
"""

from __future__ import annotations

import os

import torch

from gan_dist.errors import UserError

# CUDA_VISIBLE_DEVICES values that hide every GPU (SLURM writes NoDevFiles for none).
NO_GPUS = ("", "-1", "none", "nodevfiles", "void")


def allocated_gpus() -> str:
    """'CUDA_VISIBLE_DEVICES=0,1' (or the SLURM variable) when the environment gives this
    process GPUs, else ''."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip().lower() not in NO_GPUS:
        return f"CUDA_VISIBLE_DEVICES={visible}"
    on_node = os.environ.get("SLURM_GPUS_ON_NODE", "").strip()
    if on_node.isdigit() and int(on_node) > 0:
        return f"SLURM_GPUS_ON_NODE={on_node}"
    return ""


def cuda_problem() -> str:
    """Why torch cannot use CUDA here ('' when it can)."""
    if torch.cuda.is_available():
        return ""
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is a CPU-only build"
    try:
        torch.cuda.init()  # raises with the driver's own reason
    except Exception as err:  # noqa: BLE001 - any failure is the reason we report
        return (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
    return "torch sees no CUDA device"


def resolve_device(setting: str) -> str:
    """train.device (auto|cuda|cpu) -> 'cuda' or 'cpu', or a UserError naming what to change."""
    if setting == "cpu":
        return "cpu"
    problem = cuda_problem()
    if not problem:
        return "cuda"
    if setting == "cuda":
        raise UserError(f"train.device=cuda, but CUDA is unusable here: {problem}; fix the CUDA install "
                        "(driver, torch build) or set train.device=cpu (or auto)")
    allocated = allocated_gpus()
    if allocated:
        raise UserError(f"GPUs are allocated to this process ({allocated}), but CUDA is unusable: {problem}. "
                        "Training would silently run on the CPU: fix the CUDA install (driver, torch build), "
                        "or set train.device=cpu to train on the CPU on purpose")
    return "cpu"


def configure_gpu_math(device: str, tf32: bool, benchmark: bool) -> None:
    """train.tf32: TF32 tensor cores for float32 matmuls and convolutions (Ampere and newer);
    GAN training is insensitive to the difference and float32 runs several times faster.
    cuDNN's autotuner (`benchmark`) picks the fastest convolution for each shape once: a GAN's
    shapes never change, so it is pure gain, except under --debug, which wants determinism."""
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
        torch.backends.cudnn.benchmark = benchmark


def configure_threads(num_threads: int, device: str) -> None:
    """Pin torch's CPU threads: the config's number, or else default_num_threads (torch's
    default takes every core in every process and oversubscribes). An OMP_NUM_THREADS set by
    the user or the launcher (torchrun sets 1) is respected."""
    if num_threads:
        torch.set_num_threads(num_threads)
    elif "OMP_NUM_THREADS" not in os.environ and device == "cpu":
        torch.set_num_threads(default_num_threads())


def usable_cores() -> int:
    """The cores this process may run on (a SLURM or taskset cpuset, not the whole node; a CPU
    quota such as docker's --cpus is not visible here)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_num_threads() -> int:
    """The usable cores shared out among this node's training processes, loader workers not
    counted: they sleep most of the time, and leaving them a core each cost 25-46% of the speed
    in every row of bench/threads.py (docs/benchmarks.md), busy PNG-decoding workers included."""
    return max(1, usable_cores() // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
