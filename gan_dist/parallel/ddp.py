"""train.backend=ddp: G and D prepared by accelerate (DDP when several processes run), one
torch optimizer each; this backend owns precision: autocast around each network's forward,
and under fp16 one grad scaler per network.

Why the backend and not accelerate owns precision: accelerate keeps ONE GradScaler for both
networks, so an overflow in D's step halved G's scale too, and it ignores fp16 on a CPU
(`cpu=True`), where torch does run float16 autocast and GradScaler("cpu"): owning them here
makes fp16 behave the same on both, and testable on a CPU.

Nothing here reads a device value on the host per step. The skip decision on a non-finite
step is taken on the gradient norm after DDP's all-reduce, so every rank takes the same one
without another collective; with fused Adam it stays on the device (the kernel skips the
update when `found_inf` is set). Under fp16 the scaler unscales into the same gradients and
hands the fused kernel its own `found_inf`, and the overflow flag is the same non-finite
norm: counted at the next log line, never read per step.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


def set_hyper(optimizer, lr: float | None, beta2: float | None = None) -> None:
    """This step's (scheduled) learning rate and Adam beta2; None leaves one as it is."""
    for group in optimizer.param_groups:
        if lr is not None:
            group["lr"] = lr
        if beta2 is not None:
            group["betas"] = (group["betas"][0], beta2)


class Autocast(nn.Module):
    """A network's forward under autocast (bf16/fp16); its parameters stay fp32."""

    def __init__(self, module: nn.Module, device_type: str, dtype: torch.dtype):
        super().__init__()
        self.module, self.device_type, self.dtype = module, device_type, dtype

    def forward(self, *args, **kwargs):
        with torch.autocast(self.device_type, dtype=self.dtype):
            return self.module(*args, **kwargs)


class DDPBackend:
    name = "ddp"

    def __init__(self, accelerator, G: nn.Module, D: nn.Module, opt_G, opt_D, precision: str = "no",
                 compile_forward: bool = False):
        self.acc, self.precision = accelerator, precision
        G, D, opt_G, opt_D = accelerator.prepare(G, D, opt_G, opt_D)
        self.ddp = {"G": G, "D": D}
        for module in self.ddp.values():
            # Rank 0's buffers broadcast before every forward (five per step) buy nothing:
            # training-mode BatchNorm reads batch statistics, and sync_buffers() makes the
            # running ones equal wherever they are read. (A property in newer torch, for
            # forward_sync_buffers; after construction, so the initial sync still happens.)
            if isinstance(module, nn.parallel.DistributedDataParallel):
                module.broadcast_buffers = False
        device_type = accelerator.device.type
        # `eager` serves R1 and the gradient penalty: compiled graphs have no double backward.
        self.eager = {name: Autocast(module, device_type, HALF[precision]) if precision in HALF else module
                      for name, module in self.ddp.items()}
        self.forward = {name: torch.compile(module) if compile_forward else module for name, module in self.eager.items()}
        self.raw = {"G": accelerator.unwrap_model(G), "D": accelerator.unwrap_model(D)}
        self.optimizers = {"G": opt_G, "D": opt_D}
        self.scalers = {name: torch.amp.GradScaler(device_type) if precision == "fp16" else None for name in ("G", "D")}
        # Built once: walking the module tree every step costs more than the small ops it feeds.
        self.params = {name: [p for p in raw.parameters() if p.requires_grad] for name, raw in self.raw.items()}
        self.description = "ddp: accelerate, one torch optimizer per network" + (
            ", one fp16 grad scaler per network" if precision == "fp16" else "")

    def scaler(self, name: str):
        """The network's fp16 grad scaler (None otherwise): penalties scale their inner gradients by it."""
        return self.scalers[name]

    def loss_scale(self, name: str) -> float:
        """The network's current fp16 loss scale (a host read: for log lines, not per step)."""
        scaler = self.scalers[name]
        return scaler.get_scale() if scaler is not None else 1.0

    def zero_grad(self, name: str) -> None:
        self.optimizers[name].zero_grad(set_to_none=True)

    def micro_batch_sync(self, name: str, index: int, count: int):
        """No gradient all-reduce until the last micro-batch of a phase."""
        return nullcontext() if index == count - 1 else self.acc.no_sync(self.ddp[name])

    def backward(self, name: str, loss: torch.Tensor) -> None:
        scaler = self.scalers[name]
        (scaler.scale(loss) if scaler is not None else loss).backward()

    def step(self, name: str, max_norm: float, lr: float | None, beta2: float | None = None):
        """(gradient norm before clipping, skipped, fp16 overflow). `skipped` says the norm of the
        synchronised gradients was not finite and the update was not made; under fp16 the grad
        scaler makes that decision and it is reported as an overflow instead. Each is a bool,
        or a bool tensor on the device (fused Adam, and every fp16 step): read it at the log
        interval."""
        optimizer, scaler = self.optimizers[name], self.scalers[name]
        inner = getattr(optimizer, "optimizer", optimizer)  # the torch optimizer inside accelerate's wrapper
        if scaler is not None:
            scaler.unscale_(inner)
        params = [p for p in self.params[name] if p.grad is not None]
        if max_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        set_hyper(optimizer, lr, beta2)
        not_finite = ~torch.isfinite(norm)
        if scaler is not None:
            # Fused Adam takes the scaler's found_inf into its kernel; foreach Adam makes the
            # scaler read it on the host. The scale halves on the device.
            scaler.step(inner)
            scaler.update()
            return norm, False, not_finite
        if inner.param_groups[0].get("fused"):
            inner.found_inf = not_finite.float()  # read by Adam.step, passed to the fused kernel
            try:
                optimizer.step()
            finally:
                del inner.found_inf
            return norm, not_finite, False
        if bool(not_finite):  # a host sync per step: the foreach path (optim.fused=false)
            return norm, True, False
        optimizer.step()
        return norm, False, False

    def save(self, directory: Path, is_main: bool) -> list[Path]:
        """optimizers.pt: both Adam states and both fp16 scalers (rank 0: they are the same everywhere).
        Returns the files this rank wrote."""
        if not is_main:
            return []
        scalers = {name: s.state_dict() for name, s in self.scalers.items() if s is not None}
        torch.save({"G": self.optimizers["G"].state_dict(), "D": self.optimizers["D"].state_dict(),
                    "scalers": scalers or None}, directory / "optimizers.pt")
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
        saved = optim.get("scalers") or {}
        if not saved and optim.get("scaler") is not None:  # one shared scaler, before the split
            saved = {"G": optim["scaler"], "D": optim["scaler"]}
        for name, scaler in self.scalers.items():
            if scaler is not None and name in saved:
                scaler.load_state_dict(saved[name])
