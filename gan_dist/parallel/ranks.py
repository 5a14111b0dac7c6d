"""What keeps ranks together: one decision for all of them, buffers made equal, and the
bit-exact check that they still train the same networks.

- `decided_on_rank0`: what one rank would decide from the filesystem (which checkpoint to
  resume, whether a run directory holds a run) is decided by rank 0 alone and broadcast, so
  a stale NFS cache on another node cannot make the ranks disagree. A UserError raised there
  reaches every rank with the same message.
- `RankVote`: "did any rank see X" (a stop signal, a bad sample) without a per-step host
  read: each vote is reduced on the device and read `lag` votes later, by which time its
  copy to pinned host memory is normally done (the host waits for it only if it ran more
  than `lag` votes ahead of the device); every rank reads the same vote at the same call,
  so all act on the same step.
"""

from __future__ import annotations

import itertools
from collections import deque

import torch
from torch import nn

from gan_dist.errors import UserError


def _world_size() -> int:
    import torch.distributed as torch_dist

    return torch_dist.get_world_size() if torch_dist.is_available() and torch_dist.is_initialized() else 1


def broadcast_from_rank0(obj):
    """Rank 0's `obj` on every rank (picklable objects; one process: returned as it is)."""
    if _world_size() == 1:
        return obj
    import torch.distributed as torch_dist

    box = [obj if torch_dist.get_rank() == 0 else None]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]


def decided_on_rank0(accelerator, decide):
    """`decide()` run on rank 0 only; its result on every rank. Its UserError reaches every
    rank as the same UserError; any other exception is re-raised on rank 0 and reported on
    the others, which would otherwise wait in the broadcast until the collective timeout."""
    outcome, failure = None, None
    if accelerator.is_main_process:
        try:
            outcome = ("ok", decide())
        except UserError as err:
            outcome = ("user error", str(err))
        except Exception as err:  # noqa: BLE001 - re-raised below, after the others are told
            failure, outcome = err, ("crash", f"{type(err).__name__}: {err}")
    kind, value = broadcast_from_rank0(outcome)
    if failure is not None:
        raise failure
    if kind == "user error":
        raise UserError(value)
    if kind == "crash":
        raise RuntimeError(f"rank 0 failed while deciding for every rank: {value}")
    return value


class RankVote:
    """Every rank calls `vote(mine)` at the same points; each call returns whether any rank
    voted True `lag` calls earlier (False for the first `lag` calls)."""

    def __init__(self, accelerator, lag: int = 1):
        self.lag, self.device = lag, accelerator.device
        self.cuda = self.device.type == "cuda"
        # Pinned buffers, one per vote in flight: the copies into them never block the host.
        self.free = deque(torch.zeros(1, pin_memory=self.cuda) for _ in range(lag + 1))
        self.pending: deque = deque()

    def vote(self, mine: bool) -> bool:
        import torch.distributed as torch_dist

        # A fill kernel, not a tensor built on the host: no blocking host-to-device copy.
        flag = torch.full((1,), float(mine), device=self.device)
        torch_dist.all_reduce(flag)
        host = self.free.popleft()
        host.copy_(flag, non_blocking=self.cuda)
        event = None
        if self.cuda:
            event = torch.cuda.Event()
            event.record()
        self.pending.append((host, event))
        return self._read() if len(self.pending) > self.lag else False

    def flush(self) -> bool:
        """Every rank: read every vote still in flight (a sync point: at log lines, checkpoints, the end)."""
        verdict = False
        while self.pending:
            verdict |= self._read()
        return verdict

    def _read(self) -> bool:
        host, event = self.pending.popleft()
        if event is not None:
            event.synchronize()  # recorded `lag` votes ago: normally done, at worst a bounded wait
        verdict = bool(host.numpy()[0] > 0)  # a read of host memory, no tensor op
        self.free.append(host)
        return verdict


def sync_buffers(accelerator, *modules: nn.Module) -> None:
    """Make BatchNorm statistics (and other buffers) identical on every rank: rank 0's.

    DDP's own per-forward buffer broadcast is switched off (ddp.py): every rank updates its
    running statistics from its own batch, and training-mode BatchNorm never reads them, so
    they need to agree only where they are read: call this before grids, EMA copies and
    snapshots. Rank 0's statistics are the same either way (they follow rank 0's batches).
    """
    if accelerator.num_processes == 1:
        return
    import torch.distributed as torch_dist

    for module in modules:
        for buffer in module.buffers():
            torch_dist.broadcast(buffer.data, src=0)


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


def sum_over_ranks(accelerator, tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise sum over every rank (each rank must call it), on the device: no host read."""
    return accelerator.reduce(tensor, reduction="sum") if accelerator.num_processes > 1 else tensor
