"""The pieces `train()` wires together: run directory, data, optimizers, provenance."""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from gan_dist import config as config_mod
from gan_dist import parallel
from gan_dist.data.prepare import BUILTIN_DATASETS, write_shards
from gan_dist.data.sources import open_source
from gan_dist.data.stream import DatasetInfo, make_loader, open_dataset
from gan_dist.errors import UserError
from gan_dist.models import count_parameters

RUN_MARKER = "run.json"


def check_run_dir(run_dir: Path, overwrite: bool) -> None:
    """Refuse to mix a new run into an old one; never delete what is not a gan_dist run."""
    if not run_dir.exists() or not any(run_dir.iterdir()):
        return
    if not (run_dir / RUN_MARKER).is_file():
        raise UserError(f"{run_dir} exists and is not a gan_dist run directory; choose another run.name "
                        "or run.root")
    if not overwrite:
        raise UserError(f"{run_dir} already holds a run; choose another run.name, or pass "
                        "run.overwrite=true to replace it")


def prepare_run_dir(run_dir: Path, cfg, accelerator) -> None:
    """Rank 0 clears a run being overwritten, writes the resolved config and run.json; others wait."""
    if accelerator.is_main_process:
        if run_dir.exists() and (run_dir / RUN_MARKER).is_file():
            shutil.rmtree(run_dir)
        (run_dir / "samples").mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(config_mod.to_yaml(cfg))
        write_provenance(run_dir, accelerator, cfg.train.mixed_precision)
    accelerator.wait_for_everyone()


def builtin_path(cfg) -> Path:
    """Where a built-in dataset lives when data.path is empty: data/<name>[-<res>px]."""
    if cfg.data.dataset not in BUILTIN_DATASETS:
        raise UserError(f"data.path is empty and data.dataset='{cfg.data.dataset}' is not built in "
                        f"({', '.join(BUILTIN_DATASETS)}); set data.path to your prepared shards")
    suffix = f"-{cfg.data.resolution}px" if cfg.data.resolution else ""
    return Path("data") / f"{cfg.data.dataset}{suffix}"


def dataset_path(cfg) -> str:
    return cfg.data.path or str(builtin_path(cfg))


def open_info(cfg, accelerator) -> DatasetInfo:
    """Open the shards: rank 0 reads index.json and every rank gets its answer (a node with a
    stale or different copy cannot plan other reads). A built-in dataset at its default place
    is prepared by rank 0 first; an explicit data.path is only ever read, so a typo fails."""
    path = dataset_path(cfg)

    def decide() -> DatasetInfo:
        if not cfg.data.path and not Path(path).exists():
            write_shards(open_source(cfg.data.dataset, root=cfg.data.root, resolution=cfg.data.resolution,
                                     root_setting="data.root=DIR"), path)
        return open_dataset(path)

    info = parallel.decided_on_rank0(accelerator, decide)
    if not info.classes and cfg.data.num_classes:
        info.classes = [str(c) for c in range(cfg.data.num_classes)]
    if cfg.model.conditional and not info.num_classes:
        raise UserError(f"model.conditional=true needs the number of classes, but {path} has no index.json "
                        "listing them: point data.path at the dataset's index.json (also works over http and "
                        "pipe:), or set data.num_classes=N, or set model.conditional=false")
    return info


def read_mode(cfg, accelerator, info: DatasetInfo, previous: str | None = None) -> tuple[str, str]:
    """(how the data is read: "off" (streamed), "host" or "device" (resident), why), decided by
    rank 0 from its node's memory for data.resident=auto, so that every rank reads alike;
    `previous`: the resumed checkpoint's data mode, kept under auto while it fits."""
    import os

    from gan_dist.data import resident

    processes_on_node = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
    return parallel.decided_on_rank0(accelerator, lambda: resident.choose(
        info, cfg.data.resident, processes_on_node, resident.available_memory_bytes(), previous))


def open_loader(cfg, accelerator, info: DatasetInfo, batch_per_device: int, mode: str,
                stream_start: dict | None = None, failure_log: str = ""):
    """This rank's loader, starting where `stream_start` says (a resume) or at epoch 0. Resident
    data is read here, before training, so its load is not taken for a stalled data wait."""
    loader = make_loader(info, batch_per_device, cfg.train.seed, accelerator.process_index,
                       cfg.data.num_workers, cfg.data.shuffle_buffer,
                       pin_memory=accelerator.device.type == "cuda", world_size=accelerator.num_processes,
                       conditional=cfg.model.conditional, start=stream_start,
                       max_shard_retries=cfg.data.max_shard_retries, retry_backoff_s=cfg.data.retry_backoff_s,
                       failure_log=failure_log, resident=mode, device=accelerator.device)
    return loader.load() if mode != "off" else loader


def data_warnings(info: DatasetInfo, num_slots: int) -> list[str]:
    """What the user should know about how this dataset will be read (rank 0 prints them)."""
    from gan_dist.data.index import class_skew
    from gan_dist.data.plan import read_multiplication

    warnings = [w for w in [class_skew(info)] if w]
    factor = read_multiplication(len(info.urls), info.shard_counts, info.offsets, num_slots, info.seekable,
                                 info.chunk_size)
    if factor > 1.05:
        how = ("every slot reads every shard and keeps its share" if info.shard_counts is None else
               "a stream that cannot seek (pipe:, http without index.json's byte offsets, or a server that "
               "ignores Range requests, such as python -m http.server) reads each piece's shard from its start")
        warnings.append(f"reading this dataset with {num_slots} reader slots (processes x data.num_workers) reads "
                        f"{factor:.1f}x its bytes per epoch: {how}. Serve index.json and the shards over http(s) or a "
                        "file system, re-prepare with gan-dist prepare (which writes byte offsets), or use at "
                        "least as many shards as slots")
    return warnings


def build_optimizers(cfg, G, D) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
    def adam(module, opt_cfg):
        implementation = {"fused": True} if cfg.optim.fused else {"foreach": True}
        return torch.optim.Adam(module.parameters(), lr=opt_cfg.lr, betas=(opt_cfg.beta1, opt_cfg.beta2),
                                eps=opt_cfg.eps, weight_decay=opt_cfg.weight_decay, **implementation)

    return adam(G, cfg.optim.generator), adam(D, cfg.optim.discriminator)


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5, check=False)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except (ImportError, AttributeError):
        return None


def write_provenance(run_dir: Path, accelerator, mixed_precision: str) -> None:
    """run.json: what ran, where and with which versions; also marks the directory as a run."""
    record = {"command": sys.argv, "world_size": accelerator.num_processes,
              "distributed_type": parallel.distributed_name(accelerator),
              "device": accelerator.device.type, "mixed_precision": mixed_precision,
              "git_commit": _git_commit(), "python": platform.python_version(),
              "versions": {m: _version(m) for m in ("torch", "accelerate", "webdataset", "gan_dist")}}
    (run_dir / RUN_MARKER).write_text(json.dumps(record, indent=1))


def describe_run(cfg, accelerator, info: DatasetInfo, backend, batch_per_device: int,
                 reading: str = "") -> dict[str, str]:
    G_raw, D_raw = backend.raw["G"], backend.raw["D"]
    return {
        "devices": parallel.describe_processes(accelerator),
        "precision": backend.precision,
        "backend": backend.description,
        "model": f"{cfg.model.name}: G {count_parameters(G_raw):,} params, D {count_parameters(D_raw):,} params",
        "loss": cfg.loss.name + (f", {'R1 + R2' if cfg.loss.r2 else 'R1'} gamma {cfg.loss.r1_gamma}" if cfg.loss.r1_gamma else "")
        + (f", GP {cfg.loss.gp_weight}" if cfg.loss.gp_weight else ""),
        "dataset": f"{dataset_path(cfg)}: {info.count or '?'} samples of {list(info.shape)} {info.dtype}, "
                   f"{info.num_classes} classes" + (f"; {reading}" if reading else ""),
        "batch": f"{cfg.train.batch_size} global = {accelerator.num_processes} x {batch_per_device}"
                 f" ({cfg.train.num_micro_batches} micro-batch(es))",
        "length": f"{cfg.train.total_kimg} kimg" + (f", at most {cfg.train.max_steps} steps"
                                                     if cfg.train.max_steps else ""),
    }
