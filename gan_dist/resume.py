"""Full training checkpoints that resume bit for bit, and the resume itself.

A checkpoint is a snapshot directory (checkpoint.py: G, D, G_ema as safetensors plus
model.json, so export and sampling read it as they are) with the rest of the state beside:
- the optimizer state, written by the backend: `optimizers.pt` with both Adam states and the
  fp16 scaler (train.backend=ddp; tensors and numbers only, loaded with `weights_only=True`),
  or `deepspeed/G` and `deepspeed/D`, each engine's own checkpoint with one optimizer
  partition per rank (train.backend=deepspeed);
- `state.json`: counters, the EMA's update count, the resolved config and its hash, the
  world size, worker and thread counts, and the format version;
- `rank<R>.pt` / `rank<R>.json`, written by each rank: its RNG states (torch, CUDA, and our
  noise, penalty and augmentation generators; Python's and NumPy's as JSON) and its data
  stream position per loader worker. accelerate's save_state keeps custom state from rank 0
  only, and pickles NumPy's RNG state, which weights_only loading refuses.

Every rank writes what it owns into `step_XXXXXXXX.tmp/`; after a barrier rank 0 renames it
and points `latest` at it, last; so a crash at any moment leaves the previous checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from gan_dist import chaos, save_vote
from gan_dist.checkpoint import SNAPSHOT_FORMAT, latest_snapshot
from gan_dist.errors import UserError

STATE_FORMAT = "gan_dist.checkpoint/1"

def _read_umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it; set back at once, at import
    os.umask(mask)
    return mask


_UMASK = _read_umask()
# Keys a resumed run may change; any other difference changes tensor shapes or the training
# itself, and is refused.
MAY_CHANGE = ("run.", "log.", "checkpoint.", "dist.", "train.total_kimg", "train.max_steps", "train.resume",
              "train.max_skipped_in_row", "train.rollback_on_divergence", "data.num_workers", "data.path", "data.root", "data.resident", "data.cache_mb",
              "data.on_error", "data.max_shard_retries", "data.retry_backoff_s", "train.num_threads", "eval.", "train.compile", "train.tf32",
              "optim.fused", "train.device")
# Test-only: called with the file just written, to inject a crash between files.
_after_file_hook = None


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def _written(path: Path, rank: int) -> None:
    if _after_file_hook is not None:
        _after_file_hook(path)
    chaos.file_written(rank, path)


def _module_state(module: torch.nn.Module) -> dict:
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def _rank_state(trainer) -> tuple[dict, dict]:
    """(tensors for rank<R>.pt, plain values for rank<R>.json) of this rank."""
    tensors = {"torch": torch.get_rng_state(), "noise": trainer.noise_gen.get_state(),
               "penalty": trainer.penalty_gen.get_state(), "flip": trainer.augment.flip_gen.get_state(),
               "diffaugment": trainer.augment.gen.get_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    plain = {"python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
             "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
             "stream": trainer.stream_position()}
    if trainer.ada is not None:
        plain["ada_totals"] = trainer.ada.totals.tolist()  # this rank's, since the last adjustment
    return tensors, plain


def save_checkpoint(trainer) -> Path:
    """Every rank calls this at the same step. Whether this step is committed already (a
    periodic save at the last step, a resume of a finished run) is known in memory, the same
    on every rank: asking the filesystem could get a different answer on each node.

    Each stage that touches the disk (the temporary directory, every rank's files, the
    commit) ends in a vote instead of a barrier: a rank that failed (a full disk, a lost
    mount, a bug) stops every rank at the same point instead of leaving them waiting."""
    acc, step = trainer.acc, trainer.progress.step
    final = trainer.run_dir / "checkpoints" / f"step_{step:08d}"
    if trainer.last_checkpoint == final:
        return final
    tmp = final.with_name(final.name + ".tmp")
    vote, attempt = save_vote.vote, save_vote.attempt
    vote(trainer, tmp, final, attempt(lambda: _make_fresh(tmp)) if acc.is_main_process else None)
    vote(trainer, tmp, final, attempt(lambda: _write_rank_files(trainer, tmp)))
    vote(trainer, tmp, final, attempt(lambda: _commit(tmp, final)) if acc.is_main_process else None)
    trainer.last_checkpoint = final
    if acc.is_main_process:
        try:
            _prune(final, trainer.cfg.checkpoint.keep_last)
        except OSError:  # what cannot be removed now goes at a later save: no reason to stop
            pass
    return final


def _make_fresh(directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)


def _write_rank_files(trainer, tmp: Path) -> None:
    acc = trainer.acc
    rank = acc.process_index
    # First, on every rank: a DeepSpeed engine writes its optimizer partition through
    # collectives of its own, which would wait forever for a rank already gone to the vote.
    for path in trainer.backend.save(tmp, acc.is_main_process):
        _written(path, rank)
    tensors, plain = _rank_state(trainer)
    torch.save(tensors, tmp / f"rank{rank}.pt")
    _written(tmp / f"rank{rank}.pt", rank)
    chaos.point("checkpoint_files")  # files of the checkpoint written, others not yet
    (tmp / f"rank{rank}.json").write_text(json.dumps(plain))
    _written(tmp / f"rank{rank}.json", rank)
    if acc.is_main_process:
        _write_shared(trainer, tmp)


def save_safetensors(tensors: dict, path: Path) -> None:
    """Like safetensors' save_file, but with the mode every other file gets (0666 less the
    umask): save_file writes through a private temporary file and leaves the result 0600,
    which an export copied on and other users of a shared run directory could not read.
    Written by save_file itself (no second copy of the file in memory), then chmod-ed."""
    save_file(tensors, str(path))
    os.chmod(path, 0o666 & ~_UMASK)


def _write_shared(trainer, tmp: Path) -> None:
    for name, module in (("G", trainer.G_raw), ("D", trainer.D_raw), ("G_ema", trainer.ema.module)):
        save_safetensors(_module_state(module), tmp / f"{name}.safetensors")
        _written(tmp / f"{name}.safetensors", 0)
    (tmp / "model.json").write_text(json.dumps({"format": SNAPSHOT_FORMAT, "step": trainer.progress.step,
                                                **trainer.model_info()}, indent=1))
    _written(tmp / "model.json", 0)
    state = {"format": STATE_FORMAT, "progress": trainer.progress.counters(),
             "ema_num_averaged": int(trainer.ema.averaged.n_averaged), "config": trainer.config_dict,
             "config_hash": config_hash(trainer.config_dict),
             **layout(trainer.acc.num_processes, trainer.cfg.data.num_workers, trainer.acc.device.type,
                      trainer.info.identity()["sha256"], trainer.data_mode),
             "dataset_identity": trainer.info.identity(), "num_threads": torch.get_num_threads(),
             "num_samples": trainer.info.count, "elapsed_s": trainer.elapsed_s()}
    if trainer.ada is not None:
        state["ada"] = {"p": trainer.ada.p.item(), "signal": trainer.ada.signal.item()}
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    _written(tmp / "state.json", 0)


def _commit(tmp: Path, final: Path) -> None:
    """Rename into place, then point `latest` at it (an atomic replace), then drop what it replaced.

    An uncommitted directory of the same step (a resume from an earlier checkpoint passes
    it again) is moved aside first, never deleted before `latest` points at the new one.
    """
    aside = final.with_name(final.name + ".old")
    if final.exists():
        shutil.rmtree(aside, ignore_errors=True)
        final.rename(aside)
    tmp.rename(final)
    chaos.point("checkpoint_committed")  # renamed into place, `latest` not yet moved
    pointer = final.parent / "latest.tmp"
    pointer.write_text(final.name + "\n")
    _written(pointer, 0)
    os.replace(pointer, final.parent / "latest")
    shutil.rmtree(aside, ignore_errors=True)


def _prune(final: Path, keep_last: int) -> None:
    """Keep the newest checkpoint and the keep_last - 1 before it; never the one just written,
    nor the best one (checkpoints/best.json, periodic evaluation)."""
    best_file = final.parent / "best.json"
    best = json.loads(best_file.read_text()).get("checkpoint") if best_file.is_file() else None
    older = sorted(p for p in final.parent.glob("step_*")
                   if p.is_dir() and p.name < final.name and p.name[5:].isdigit() and p.name != best)
    for old in older[: max(0, len(older) - (keep_last - 1))] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


FINISHED = "finished.json"


def mark_finished(snapshot: Path, step: int, kimg: float) -> None:
    """Rank 0, at the very end of a run (final grid, snapshot and evaluation done). A run
    stopped at its last step, or one that died in its final evaluation, has the same counters
    but no mark, so its resume still runs the end."""
    (snapshot / FINISHED).write_text(json.dumps({"step": step, "kimg": kimg}) + "\n")


def is_finished(checkpoint: Path) -> bool:
    return (checkpoint / FINISHED).is_file()


def find_checkpoint(run_dir: Path, resume: str) -> Path | None:
    """The checkpoint train.resume points at: 'none', 'auto' (this run's latest, if any), or a path."""
    if resume == "none":
        return None
    if resume == "auto":
        pointer = run_dir / "checkpoints" / "latest"
        return latest_snapshot(run_dir) if pointer.is_file() else None
    path = Path(resume)
    if (path / "state.json").is_file():
        return path
    if (path / "checkpoints" / "latest").is_file():
        return latest_snapshot(path)
    raise UserError(f"train.resume={resume} is neither a checkpoint directory (with state.json) nor a run "
                    "directory with checkpoints/latest; use auto, none, or such a path")


def read_state(checkpoint: Path) -> dict:
    try:
        state = json.loads((checkpoint / "state.json").read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"cannot resume from {checkpoint}: state.json is missing or unreadable ({err}); "
                        "it was written by an older gan_dist or is damaged: pass run.overwrite=true to start "
                        "this run afresh, or train.resume=PATH to another checkpoint") from err
    if state.get("format") != STATE_FORMAT:
        raise UserError(f"cannot resume from {checkpoint}: its format is {state.get('format')!r} and this "
                        f"gan_dist reads {STATE_FORMAT}; resume it with the gan_dist version that wrote it")
    state.setdefault("device", checkpoint_device(checkpoint, state))
    return state


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_compatible(checkpoint: Path, saved_config: dict, config: dict) -> None:
    """Refuse a resume whose config changes tensor shapes or the training; list every difference."""
    from gan_dist.config import Config, to_dict

    saved, new, defaults = _flat(saved_config), _flat(config), _flat(to_dict(Config()))
    # A key added after the checkpoint was written is fine at its default value.
    differ = [k for k in sorted(set(saved) | set(new))
              if not k.startswith(MAY_CHANGE) and saved.get(k, defaults.get(k)) != new.get(k)]
    if differ:
        listed = "; ".join(f"{k}: {saved.get(k, defaults.get(k))!r} -> {new.get(k)!r}" for k in differ)
        raise UserError(f"cannot resume from {checkpoint}: {listed}. Set these back, or start a new run "
                        "(another run.name, or run.overwrite=true to replace this one)")


def check_data_matches(checkpoint: Path, info) -> None:
    """data.path may move, but not to data of another shape or class count."""
    model = json.loads((checkpoint / "model.json").read_text())
    num_classes = model.get("data_num_classes", model["num_classes"])  # before G's own count was recorded apart
    if list(info.shape) != model["shape"] or info.num_classes != num_classes:
        raise UserError(f"cannot resume from {checkpoint}: it was trained on samples of shape {model['shape']} with "
                        f"{num_classes} classes, and data.path now has {list(info.shape)} with "
                        f"{info.num_classes}; point data.path at the run's data")


def load_tensors(path: Path) -> dict:
    """torch.load restricted to tensors and plain containers: a pickle that would run code is refused."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError for unsafe payloads, RuntimeError for damaged files
        raise UserError(f"refused to load {path}: it is not a plain tensor file "
                        f"({type(err).__name__}: {str(err).splitlines()[0][:200]})") from err


def checkpoint_device(checkpoint: Path, state: dict) -> str:
    """'cpu' or 'cuda': where the checkpoint's run trained. Checkpoints from before state.json
    recorded it say so by their CUDA RNG state, which only a CUDA process saves."""
    if "device" in state:
        return state["device"]
    return "cuda" if "cuda" in load_tensors(checkpoint / "rank0.pt") else "cpu"


def data_mode(read_mode: str) -> str:
    """How positions are counted: in a streamed dataset (this version's shuffle), or resident
    (host and device memory give the same order, so switching between them is no change)."""
    from gan_dist.data.stream import STREAM_FORMAT

    return STREAM_FORMAT if read_mode == "off" else "resident"


def layout(world_size: int, num_workers: int, device: str, dataset: str, mode: str) -> dict:
    """What a bit-exact resume needs unchanged: every per-rank, per-worker random stream and
    data position belongs to one rank, one worker (resident data has none: 0) and one device
    type (a CUDA generator takes no CPU generator's state), to one dataset (a re-prepared one
    has other samples at every stream position), and to one way of reading it."""
    return {"world_size": world_size, "num_workers": 0 if mode == "resident" else num_workers, "device": device,
            "dataset": dataset, "data_mode": mode}


# Checkpoints from before a key was recorded are taken to match on it, except the data mode:
# a checkpoint without one counted positions in the stream before chunks, with another shuffle.
RECORDED_SINCE = {"data_mode": "stream/1"}


def same_layout(state: dict, now: dict) -> bool:
    return all(state.get(key, RECORDED_SINCE.get(key)) in (None, value) for key, value in now.items())


def describe_layout(values: dict) -> str:
    mode = values.get("data_mode", RECORDED_SINCE["data_mode"])
    reading = "resident" if mode == "resident" else f"{values['num_workers']} workers ({mode})"
    return (f"{values['world_size']} processes x {reading} on {values['device']}, "
            f"dataset {values.get('dataset') or '(not recorded)'}")


def batches_read(state: dict) -> int:
    """Batches the run read from its data (one per D step before G phases read reals too)."""
    progress = state["progress"]
    return progress.get("num_batches", progress["num_d_steps"])


def stream_start(checkpoint: Path, state: dict, rank: int, now: dict) -> dict | None:
    """Where this rank's stream resumes: per-worker (epoch, position) and the worker rotation."""
    num_workers = now["num_workers"]
    if not same_layout(state, now):
        # New stream positions: every worker starts the epoch after the one the run was in,
        # so the opening of the dataset is not replayed.
        images_seen = batches_read(state) * state["config"]["train"]["batch_size"]
        return {"rotation": 0, "workers": {}, "epoch": images_seen // max(1, state.get("num_samples", 0)) + 1}
    stream = json.loads((checkpoint / f"rank{rank}.json").read_text())["stream"]
    # The loader's workers take turns batch by batch, so the batch count says who is next.
    return {"rotation": batches_read(state) % max(1, num_workers),
            "workers": {int(w): tuple(pos) for w, pos in stream["workers"].items()}}


def restore(trainer, checkpoint: Path, state: dict) -> None:
    """Load everything into a freshly built trainer (every rank)."""
    for name, module in (("G", trainer.G_raw), ("D", trainer.D_raw), ("G_ema", trainer.ema.module)):
        module.load_state_dict(load_file(str(checkpoint / f"{name}.safetensors")))
    trainer.ema.restore(state["ema_num_averaged"])
    trainer.backend.load(checkpoint, load_tensors)
    trainer.progress.restore(state["progress"])
    if trainer.ada is not None:  # check_compatible refuses a resume that turns ADA on or off
        trainer.ada.load(state["ada"])
    acc = trainer.acc
    now = layout(acc.num_processes, trainer.cfg.data.num_workers, acc.device.type, trainer.info.identity()["sha256"],
                 trainer.data_mode)
    if same_layout(state, now):
        _restore_rng(trainer, checkpoint, acc.process_index)
    else:
        trainer.reseed(salt=trainer.progress.step)
        trainer.console.print(f"resumed with {describe_layout(now)} where the checkpoint had {describe_layout(state)}: "
                              "noise and augmentation are re-derived from (seed, rank, step) and the data streams "
                              "start at the next epoch, so this continuation is not the one the original layout "
                              "would have trained" + (" (the dataset differs from the checkpoint's: re-prepared or "
                                                      "replaced)" if state.get("dataset") not in (None, now["dataset"])
                                                      else ""))
    if state.get("num_threads") != torch.get_num_threads():
        trainer.console.warn(f"the checkpoint ran with {state.get('num_threads')} torch threads, this process has "
                             f"{torch.get_num_threads()}: results differ in the last bits (pin train.num_threads)")
    trainer.progress.last_log_images = trainer.num_images
    trainer.elapsed_before_s = state.get("elapsed_s", 0.0)
    trainer.last_checkpoint = checkpoint


def _restore_rng(trainer, checkpoint: Path, rank: int) -> None:
    """RNG states and the stream position (counted from the start of the run, across resumes)."""
    tensors = load_tensors(checkpoint / f"rank{rank}.pt")
    plain = json.loads((checkpoint / f"rank{rank}.json").read_text())
    stream = plain["stream"]
    # As batches report it: (epoch, position, (step, delivered) of that epoch's failures);
    # failures of later epochs are replayed from the loader's start (stream_failures).
    trainer.stream_workers = {int(w): (pos[0], pos[1], tuple((s, n) for e, s, n in (pos[2] if len(pos) > 2 else [])
                                                           if e == pos[0]))
                              for w, pos in stream["workers"].items()}
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])
    for name, gen in (("noise", trainer.noise_gen), ("penalty", trainer.penalty_gen),
                      ("flip", trainer.augment.flip_gen), ("diffaugment", trainer.augment.gen)):
        gen.set_state(tensors[name])
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    if trainer.ada is not None:  # (another layout: each rank's window starts empty, the signal is a mean)
        trainer.ada.load_totals(plain["ada_totals"])
