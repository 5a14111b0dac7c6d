"""train.backend=ddp: G and D prepared by accelerate (DDP when several processes run), one
torch optimizer each, and accelerate's grad scaler under fp16.

The skip decision on a non-finite step is taken on the gradient norm after DDP's all-reduce,
so every rank takes the same one without another collective. With fused Adam (optim.fused)
it is taken on the device: the kernel skips the update when `found_inf` is set, so the hot
loop never waits for the host to read the norm.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn



def set_lr(optimizer, lr: float | None) -> None:
    if lr is not None:
        for group in optimizer.param_groups:
            group["lr"] = lr


class DDPBackend:
    name = "ddp"

    def __init__(self, accelerator, G: nn.Module, D: nn.Module, opt_G, opt_D, compile_forward: bool = False):
        self.acc = accelerator
        G, D, opt_G, opt_D = accelerator.prepare(G, D, opt_G, opt_D)
        # `eager` serves R1 and the gradient penalty: compiled graphs have no double backward.
        self.eager = {"G": G, "D": D}
        self.forward = {name: torch.compile(module) if compile_forward else module for name, module in self.eager.items()}
        self.raw = {"G": accelerator.unwrap_model(G), "D": accelerator.unwrap_model(D)}
        self.optimizers = {"G": opt_G, "D": opt_D}
        # Built once: walking the module tree every step costs more than the small ops it feeds.
        self.params = {name: [p for p in raw.parameters() if p.requires_grad] for name, raw in self.raw.items()}
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

    def step(self, name: str, max_norm: float, lr: float | None):
        """(gradient norm before clipping, skipped, fp16 overflow). `skipped` says the norm of the
        synchronised gradients was not finite and the update was not made: a bool, or a bool
        tensor on the device with fused Adam (read it at the log interval). Under fp16 the grad
        scaler decides instead and reports an overflow."""
        optimizer = self.optimizers[name]
        self.acc.unscale_gradients(optimizer=optimizer)
        params = [p for p in self.params[name] if p.grad is not None]
        if max_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        set_lr(optimizer, lr)
        if self.acc.scaler is not None:
            # With fused Adam the scaler always calls step() (the kernel skips on found_inf), so
            # step_was_skipped stays False: an overflow shows as the scale going down.
            scale_before = self.acc.scaler.get_scale()
            optimizer.step()
            return norm, False, self.acc.scaler.get_scale() < scale_before
        skipped = ~torch.isfinite(norm)
        inner = getattr(optimizer, "optimizer", optimizer)
        if inner.param_groups[0].get("fused"):
            inner.found_inf = skipped.float()  # read by Adam.step, passed to the fused kernel
            try:
                optimizer.step()
            finally:
                del inner.found_inf
            return norm, skipped, False
        if bool(skipped):  # a host sync per step: the foreach path (optim.fused=false)
            return norm, True, False
        optimizer.step()
        return norm, False, False

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
        for name in ("G", "D"):
            optimizer = self.optimizers[name]
            # load_state_dict brings back the saved run's kernel choice; optim.fused is this run's.
            kernels = {k: optimizer.param_groups[0].get(k) for k in ("fused", "foreach")}
            optimizer.load_state_dict(optim[name])
            for group in optimizer.param_groups:
                group.update(kernels)
        if self.acc.scaler is not None and optim["scaler"] is not None:
            self.acc.scaler.load_state_dict(optim["scaler"])
