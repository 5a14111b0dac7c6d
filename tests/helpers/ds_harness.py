"""The DeepSpeed tests' cases, all in one launch (test-only; DeepSpeed's start-up is slow).

    torchrun --nproc_per_node 2 ds_harness.py DIGITS8 DIGITS16 OUT_DIR CASE [CASE ...]

Each case runs the product's own `train()` in this process and writes
OUT_DIR/<case>/rank<R>.pt: final G, D and G_ema weights, the outcome, and what the probes saw:
- `leak`: after each of G's backward passes, how much of D's gradient state is not empty
  (D's .grad tensors, its ZeRO gradient partitions, its reduce buckets);
- `memory`: per network, the bytes this rank holds (parallel.zero.memory_per_rank) after the
  second backward pass, when Adam's state exists and the gradients are still held, and the
  most its reduction buckets held during the passes (parallel.zero.watch_buckets).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from poison import nan_on_rank1

from gan_dist import parallel
from gan_dist import trainer as trainer_mod

ROOT = Path(__file__).resolve().parents[2]
BASE = ["data.num_workers=0", "model.g_norm=none", "log.every_steps=5", "optim.generator.lr=2e-3",
        "optim.discriminator.lr=2e-3", "loss.name=nonsaturating", "loss.r1_gamma=1", "loss.r1_interval=1"]
DCGAN = ["model.name=dcgan", "model.width_mult=0.25", "data.resolution=16"]
DS = ["train.backend=deepspeed"]
CODE = ["model.num_latent_categories=4", "loss.info_weight=1"]
RESUME = [*DS, "deepspeed.zero_stage=2", "run.overwrite=false", "checkpoint.every_kimg=0", "train.total_kimg=5"]

MODERN = ["loss.name=relativistic", "loss.r1_gamma=1", "loss.r2=true", "loss.r1_interval=1",
          "optim.discriminator.beta2_schedule.end=0.9", "optim.discriminator.beta2_schedule.kimg=0.1",
          "optim.generator.lr_schedule.end=1e-5", "optim.generator.lr_schedule.kimg=0.1"]
CASES = {
    # Same initial weights, same per-rank noise and batches: the backends must agree.
    "ddp": ["train.max_steps=5"],
    "zero1": [*DS, "deepspeed.zero_stage=1", "train.max_steps=5"],
    "zero2": [*DS, "deepspeed.zero_stage=2", "train.max_steps=5"],
    # InfoGAN's code head: a keyword argument to D and a second output, through the engines too.
    "ddp-code": ["train.max_steps=5", *CODE],
    "zero2-code": [*DS, "deepspeed.zero_stage=2", "train.max_steps=5", *CODE],
    # R3GAN's recipe: R1 and R2 on the raw modules, the G phase reading reals, beta2 and lr moving.
    "ddp-modern": ["train.max_steps=5", *MODERN],
    "zero2-modern": [*DS, "deepspeed.zero_stage=2", "train.max_steps=5", *MODERN],
    # The leak probe's negative control: D left unfrozen in G's step must show up.
    "zero1-unfrozen": [*DS, "deepspeed.zero_stage=1", "train.max_steps=2"],
    "resume-full": [*RESUME, "run.name=resume-full", "train.max_steps=20"],
    "resume-leg1": [*RESUME, "run.name=resume-split", "train.max_steps=10"],
    "resume-leg2": [*RESUME, "run.name=resume-split", "train.max_steps=20"],
    "bf16-zero2": [*DS, "deepspeed.zero_stage=2", "train.mixed_precision=bf16", "train.max_steps=4"],
    "bf16-zero2-code": [*DS, "deepspeed.zero_stage=2", "train.mixed_precision=bf16", "train.max_steps=4", *CODE],
    # BatchNorm in G and spectral norm in D under half precision: both run in fp32 with fp32
    # buffers (bf16 convolutions are slow on CPUs: 2 steps).
    "bf16-dcgan-zero1": [*DS, *DCGAN, "model.g_norm=batch", "model.d_norm=spectral", "deepspeed.zero_stage=1",
                         "train.mixed_precision=bf16", "train.max_steps=2"],
    # NaN reals on rank 1 at the 3rd batch: every rank must skip that D step, at every stage.
    **{f"nan-zero{stage}": [*DS, f"deepspeed.zero_stage={stage}", "train.max_steps=5"] for stage in (0, 1, 2)},
    **{f"memory-zero{stage}": [*DS, *DCGAN, f"deepspeed.zero_stage={stage}", "train.max_steps=2"]
       for stage in (0, 1, 2)},
}

CURRENT: dict = {}
_fit = trainer_mod.Trainer.fit
_frozen = parallel.frozen


def d_gradient_state(backend) -> float:
    """Sum of |values| of everything that holds D's gradients, plus queued bucket elements."""
    total = sum(float(p.grad.abs().sum()) for p in backend.raw["D"].parameters() if p.grad is not None)
    optimizer = getattr(backend, "engines", {}).get("D")
    optimizer = optimizer.optimizer if optimizer is not None else None
    for group in (getattr(optimizer, "averaged_gradients", None) or {}).values():
        total += sum(float(g.abs().sum()) for g in group or [] if g is not None)
    for bucket in (getattr(optimizer, "ipg_buckets", None) or {}).values():
        total += bucket.elements
    return total


def probe(trainer) -> None:
    from gan_dist.parallel.zero import watch_buckets

    backend, backward, calls = trainer.backend, trainer.backend.backward, {"G": 0, "D": 0}
    buckets = {name: watch_buckets(engine) for name, engine in getattr(backend, "engines", {}).items()}

    def probed(name, loss):
        backward(name, loss)
        calls[name] += 1
        if name == "G":
            CURRENT["leak"].append(d_gradient_state(backend))
        if calls[name] == 2 and hasattr(backend, "engines"):
            from gan_dist.parallel.zero import memory_per_rank

            CURRENT["memory"][name] = {**memory_per_rank(backend.engines[name]), "buckets": buckets[name]["bytes"]}

    backend.backward = probed


def fit(self) -> None:
    probe(self)
    if CURRENT["case"].startswith("nan-"):
        nan_on_rank1(self)
    initial = {k: v.clone() for k, v in self.G_raw.state_dict().items()}
    try:
        _fit(self)
    finally:
        CURRENT["state"] = {"G0": initial, **{name: {k: v.detach().float().cpu().clone()
                                                      for k, v in module.state_dict().items()}
                                               for name, module in (("G", self.G_raw), ("D", self.D_raw),
                                                                    ("G_ema", self.ema.module))},
                            "step": self.progress.step, "skipped": dict(self.progress.num_skipped),
                            "dtypes": {name: {k: v.dtype for k, v in module.state_dict().items()}
                                       for name, module in (("G", self.G_raw), ("D", self.D_raw))}}


trainer_mod.Trainer.fit = fit


def main() -> None:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    # The process group outlives each case (see harness.py).
    Accelerator.end_training = lambda self: None
    from gan_dist.train import train

    digits8, digits16, out = sys.argv[1:4]
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    for case in sys.argv[4:]:
        CURRENT.update(case=case, state={}, leak=[], memory={})
        # The negative control: no freezing of D (only for that case).
        parallel.frozen = (lambda params: _frozen([])) if case.endswith("unfrozen") else _frozen
        data = digits16 if "model.name=dcgan" in CASES[case] else digits8
        overrides = [*BASE, f"data.path={data}", f"run.root={out}/runs", f"run.name={case}", "run.overwrite=true",
                     *CASES[case]]
        try:
            train(str(ROOT / "configs" / "tiny.yaml"), overrides)
            outcome = "ok"
        except Exception as err:  # noqa: BLE001 - the test reads the outcome
            outcome = f"{type(err).__name__}: {err}"
        (Path(out) / case).mkdir(parents=True, exist_ok=True)
        torch.save({**CURRENT["state"], "leak": CURRENT["leak"], "memory": CURRENT["memory"],
                    "outcome": outcome, "world_size": world}, Path(out) / case / f"rank{rank}.pt")
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


if __name__ == "__main__":
    main()
