"""A checkpoint save's failures, agreed on by every rank (resume.save_checkpoint).

Each stage of a save that touches the disk ends in `vote` instead of a barrier: the ranks
sum (failed, disk full), so one rank's failure (a full disk, a lost mount, a bug) stops every
rank at the same point, with one line each, instead of leaving the others waiting for it.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import torch

from gan_dist import chaos, parallel
from gan_dist.errors import UserError


def attempt(action) -> Exception | None:
    """`action()`'s exception, returned so that every rank still reaches the vote."""
    try:
        action()
    except Exception as err:  # noqa: BLE001 - any failure is voted on, then reported or re-raised
        return err
    return None


def vote(trainer, tmp: Path, final: Path, failure: Exception | None) -> None:
    """Every rank: (any rank failed, any rank's disk is full), summed over the ranks; a
    failure anywhere stops them all here."""
    acc = trainer.acc
    full = failure is not None and _is_disk_full(failure, trainer, final.parent)
    votes = parallel.sum_over_ranks(acc, torch.tensor([float(failure is not None), float(full)], device=acc.device))
    if votes[0].item():
        _give_up_on(trainer, tmp, final, failure, full, bool(votes[1].item()))


_FULL_DISK_WORDS = ("No space left", "os error 28", "Disk quota exceeded", "os error 122")
# What the writers (torch.save, safetensors) say about storage they could not use; their
# errors are no OSError, but are storage all the same, not a bug of ours.
_STORAGE_WORDS = ("inline_container", "open file failed", "os error", "Parent directory", "No such file",
                  "Permission denied", "Input/output error")


def _is_disk_full(err: Exception, trainer, directory: Path) -> bool:
    """Never raises: a rank that failed here would leave the others waiting in the vote."""
    try:
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(words in str(err) for words in _FULL_DISK_WORDS):
            return True
        # torch.save's error on a full disk names no cause ("unexpected pos N vs M"): the free space decides.
        return "unexpected pos" in str(err) and chaos.free_bytes(directory) < _needed_bytes(trainer)
    except Exception:  # noqa: BLE001 - a lost mount can fail the size and free-space reads too
        return False


def _is_storage(err: Exception) -> bool:
    return isinstance(err, OSError) or type(err).__name__ == "SafetensorError" or \
        (isinstance(err, RuntimeError) and any(words in str(err) for words in _STORAGE_WORDS))


def _give_up_on(trainer, tmp: Path, final: Path, failure: Exception | None, full_here: bool,
                full_anywhere: bool) -> None:
    """Every rank: remove the partial checkpoint (rank 0), then stop with one line that says
    where, how much a checkpoint takes, and what `latest` still names. A failure that is not
    storage (a bug) is raised as it is, traceback and all, on the rank that met it."""
    acc = trainer.acc
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    acc.wait_for_everyone()
    if failure is not None and not full_here and not _is_storage(failure):
        raise failure
    previous = trainer.last_checkpoint
    # Without a checkpoint the run directory holds a run that cannot resume: say how to start it again.
    resumes = f"it resumes from {previous.name}" if previous is not None else \
        "add run.overwrite=true (there is no checkpoint yet, so it starts again)"
    if failure is not None:
        reason = failure.strerror if isinstance(failure, OSError) and failure.strerror else \
            f"{type(failure).__name__}: {str(failure).splitlines()[0][:200] if str(failure) else ''}"
        where = f"this rank: {reason}"
    else:
        where = "another rank's disk is full" if full_anywhere else "another rank could not write its files"
    if not (full_here or (failure is None and full_anywhere)):
        raise UserError(f"cannot write checkpoint {final} ({where}); fix the storage of {final.parent} or move "
                        f"run.root, then run the same command: {resumes}")
    try:
        sizes = f"{_size(_needed_bytes(trainer))} and {final.parent} has {_size(chaos.free_bytes(final.parent))} free"
    except OSError as err:
        sizes = f"an unknown size ({final.parent}: {err.strerror})"
    raise UserError(f"no space left for checkpoint {final} ({where}): a checkpoint takes about {sizes}; "
                    f"free space there or move run.root, then run the same command: {resumes}")


def _size(num_bytes: int) -> str:
    """KiB below 10 MiB: "0.4 MiB needed, 0.4 MiB free" would hide which is larger."""
    return f"{num_bytes / 2**20:.1f} MiB" if num_bytes >= 10 * 2**20 else f"{num_bytes / 1024:.0f} KiB"


def _needed_bytes(trainer) -> int:
    """The previous checkpoint's size, or an estimate from the parameter count before the first."""
    previous = trainer.last_checkpoint
    return _dir_bytes(previous) if previous is not None and previous.is_dir() else _estimated_bytes(trainer)


def _dir_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())  # deepspeed/ too


def _estimated_bytes(trainer) -> int:
    """Before the first checkpoint: weights of G, D and G_ema, and Adam's two moments of G and D."""
    sizes = {name: sum(p.numel() * p.element_size() for p in module.parameters())
             for name, module in (("G", trainer.G_raw), ("D", trainer.D_raw))}
    return 4 * sizes["G"] + 3 * sizes["D"]
