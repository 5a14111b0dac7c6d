"""train.backend=ddp: G and D prepared by accelerate (DDP when several processes run), one
torch optimizer each, and accelerate's grad scaler under fp16.

The skip decision on a non-finite step is taken on the gradient norm after DDP's all-reduce,
so every rank takes the same one without another collective.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

from gan_dist.dist import APPLIED, FP16_OVERFLOW, SKIPPED


def set_lr(optimizer, lr: float | None) -> None:
    if lr is not None:
        for group in optimizer.param_groups:
            group["lr"] = lr


class DDPBackend:
    name = "ddp"

    def __init__(self, accelerator, G: nn.Module, D: nn.Module, opt_G, opt_D):
        self.acc = accelerator
        G, D, opt_G, opt_D = accelerator.prepare(G, D, opt_G, opt_D)
        self.forward = {"G": G, "D": D}
        self.raw = {"G": accelerator.unwrap_model(G), "D": accelerator.unwrap_model(D)}
        self.optimizers = {"G": opt_G, "D": opt_D}
        self.precision = accelerator.mixed_precision
        self.description = "ddp: accelerate, one torch optimizer per network"

    @property
    def scaler(self):
        """The fp16 grad scaler (None otherwise): the penalties scale their inner gradients by it."""
        return self.acc.scaler

    def loss_scale(self, name: str) -> float:
        return self.acc.scaler.get_scale() if self.acc.scaler is not None else 1.0

    def zero_grad(self, name: str) -> None:
        self.optimizers[name].zero_grad(set_to_none=True)

    def micro_batch_sync(self, name: str, index: int, count: int):
        """No gradient all-reduce until the last micro-batch of a phase."""
        return nullcontext() if index == count - 1 else self.acc.no_sync(self.forward[name])

    def backward(self, name: str, loss: torch.Tensor) -> None:
        self.acc.backward(loss)

    def step(self, name: str, max_norm: float, lr: float | None) -> tuple[torch.Tensor, str]:
        """(gradient norm before clipping, outcome): the step is skipped when the norm of the
        synchronised gradients is not finite (under fp16 the scaler decides instead)."""
        optimizer = self.optimizers[name]
        self.acc.unscale_gradients(optimizer=optimizer)
        params = [p for p in self.raw[name].parameters() if p.grad is not None]
        if max_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if self.acc.scaler is None and not bool(torch.isfinite(norm)):
            return norm, SKIPPED
        set_lr(optimizer, lr)
        optimizer.step()
        if self.acc.scaler is not None and optimizer.step_was_skipped:
            return norm, FP16_OVERFLOW
        return norm, APPLIED

    def save(self, directory: Path, is_main: bool) -> list[Path]:
        """optimizers.pt: both Adam states and the fp16 scaler (rank 0: they are the same everywhere).
        Returns the files this rank wrote."""
        if not is_main:
            return []
        torch.save({"G": self.optimizers["G"].state_dict(), "D": self.optimizers["D"].state_dict(),
                    "scaler": self.acc.scaler.state_dict() if self.acc.scaler is not None else None},
                   directory / "optimizers.pt")
        return [directory / "optimizers.pt"]

    def load(self, checkpoint: Path, load_tensors) -> None:
        optim = load_tensors(checkpoint / "optimizers.pt")
        self.optimizers["G"].load_state_dict(optim["G"])
        self.optimizers["D"].load_state_dict(optim["D"])
        if self.acc.scaler is not None and optim["scaler"] is not None:
            self.acc.scaler.load_state_dict(optim["scaler"])
