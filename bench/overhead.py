"""gan_dist's trainer against a minimal hand-written PyTorch GAN loop: what the framework costs.

    python bench/overhead.py [--configs mlp dcgan32] [--repeats 5] [--steps 60] [--threads 1]

Both sides train the same G and D (built by gan_dist's model registry from the same seed),
with the same batch, Adam settings (fused), non-saturating loss and data already in memory
(the 8x8 digits resized to the config's resolution, one process on the CPU). The bare loop
also does what the trainer does besides the two phases, so the ratio measures overhead only:
the same EMA of G (torch.optim.swa_utils, same decay rule), the gradient norms, and the
statistics kept on the device and reduced once per log interval.

Runs alternate (ours, bare, ours, bare, ...); each measures img/s over `--steps` steps after
`--warmup` steps, and the table gives the medians and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {
    # the tutorial MLP at 28 px, and an unconditional DCGAN-32 (BatchNorm G, spectral-norm D)
    "mlp": ("mlp_mnist.yaml", 28, []),
    "dcgan32": ("dcgan_mnist32.yaml", 32, ["model.conditional=false"]),
}
COMMON = ["loss.name=nonsaturating", "train.n_critic=1", "log.every_steps=20", "log.sample_every_kimg=1e9",
          "checkpoint.every_kimg=0", "checkpoint.every_minutes=0", "data.num_workers=0", "train.ema_rampup=0"]


def in_memory(images: torch.Tensor, batch: int):
    """Endless batches from a uint8 tensor, as the trainer's loader delivers them."""
    from gan_dist.data.stream import Batch

    labels = torch.zeros(len(images), dtype=torch.int64)
    start = 0
    while True:
        rows = torch.arange(start, start + batch) % len(images)
        start += batch
        samples = images[rows]  # indexing makes a new tensor, in pageable memory
        # As the real loader (pin_memory=True) hands batches over: the copy to the GPU is async.
        yield Batch(samples.pin_memory() if images.is_pinned() else samples, labels[rows], [""] * batch)


def run_ours(config: str, overrides: list[str], images: torch.Tensor, steps: int, warmup: int,
             syncs: list | None = None, run_root: str | None = None, after_warmup=None) -> float:
    """img/s of gan_dist's Trainer over `steps` steps after `warmup` (train() builds everything).
    With a `syncs` list (GPU), each step after the warm-up runs under
    torch.cuda.set_sync_debug_mode("warn") and every host synchronisation warning it raises
    is appended as (file, line, message). `run_root` keeps the run's outputs there;
    `after_warmup()` is called once, when the warm-up steps are done."""
    from gan_dist import run as run_mod
    from gan_dist import trainer as trainer_mod
    from gan_dist.data.stream import DatasetInfo
    from gan_dist.train import train

    stamps = []
    original = run_mod.open_info, run_mod.open_loader, trainer_mod.Trainer._step_once

    def open_info(cfg, accelerator):
        return DatasetInfo(urls=[], shape=tuple(images.shape[1:]), dtype="uint8", count=len(images))

    def open_loader(cfg, accelerator, info, batch_per_device, *args):
        return in_memory(images, batch_per_device)

    def step_once(self, batches):
        if syncs is not None and len(stamps) >= warmup:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    original[2](self, batches)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            syncs.extend((w.filename, w.lineno, str(w.message).splitlines()[0]) for w in caught
                         if "synchroniz" in str(w.message))
        else:
            original[2](self, batches)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        if after_warmup is not None and len(stamps) == warmup:
            after_warmup()

    run_mod.open_info, run_mod.open_loader, trainer_mod.Trainer._step_once = open_info, open_loader, step_once
    try:
        with tempfile.TemporaryDirectory() as root:
            train(str(ROOT / "configs" / config), [*overrides, f"run.root={run_root or root}", "run.overwrite=true",
                                                   "train.resume=none", f"train.max_steps={warmup + steps}"])
    finally:
        run_mod.open_info, run_mod.open_loader, trainer_mod.Trainer._step_once = original
    batch = int(next(o for o in overrides if o.startswith("train.batch_size=")).split("=")[1])
    return steps * batch / (stamps[-1] - stamps[warmup - 1])


def run_bare(cfg, images: torch.Tensor, steps: int, warmup: int, device="cpu") -> float:
    """The loop a user would write, doing the same work per step as the trainer."""
    from torch.nn.functional import softplus
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    from gan_dist.models import build_models

    torch.manual_seed(cfg.train.seed)
    G, D = (m.to(device) for m in build_models(cfg.model, tuple(images.shape[1:]), 0))

    def adam(module, o):
        return torch.optim.Adam(module.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, fused=True)

    opt_G, opt_D = adam(G, cfg.optim.generator), adam(D, cfg.optim.discriminator)
    ema = AveragedModel(G, use_buffers=False).requires_grad_(False)
    decay = 0.5 ** (cfg.train.batch_size / (cfg.train.ema_half_life_kimg * 1000))
    ema.multi_avg_fn = get_ema_multi_avg_fn(decay)
    batches, stats, stamps = in_memory(images, cfg.train.batch_size), [], []
    for step in range(warmup + steps):
        real = next(batches).samples.to(device, non_blocking=True).float().div_(127.5).sub_(1.0)
        z = torch.randn(len(real), cfg.model.latent_dim, device=device)
        with torch.no_grad():
            fake = G(z)
        d_loss = softplus(-D(real)).mean() + softplus(D(fake)).mean()
        opt_D.zero_grad(set_to_none=True)
        d_loss.backward()
        d_norm = torch.nn.utils.get_total_norm([p.grad for p in D.parameters()])
        opt_D.step()
        D.requires_grad_(False)
        g_loss = softplus(-D(G(torch.randn(len(real), cfg.model.latent_dim, device=device)))).mean()
        opt_G.zero_grad(set_to_none=True)
        g_loss.backward()
        g_norm = torch.nn.utils.get_total_norm([p.grad for p in G.parameters()])
        opt_G.step()
        D.requires_grad_(True)
        ema.update_parameters(G)
        stats.append(torch.stack([d_loss.detach(), g_loss.detach(), d_norm, g_norm]))
        if (step + 1) % cfg.log.every_steps == 0:
            torch.stack(stats).mean(0).tolist()  # the once-per-interval reduction
            stats.clear()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
    return steps * cfg.train.batch_size / (stamps[-1] - stamps[warmup - 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from gan_dist.config import load_config
    from gan_dist.data.sources import digits

    print(f"| config | batch | gan_dist img/s (median of {args.repeats}) | bare loop img/s | ratio | "
          "all ratios |\n|---|---|---|---|---|---|", flush=True)
    for name in args.configs:
        config, resolution, extra = CONFIGS[name]
        overrides = [*COMMON, *extra, f"train.batch_size={args.batch}", f"train.num_threads={args.threads}"]
        cfg = load_config(str(ROOT / "configs" / config), overrides)
        images = torch.from_numpy(digits(resolution).samples)
        ours, bare = [], []
        for _ in range(args.repeats):
            ours.append(run_ours(config, overrides, images, args.steps, args.warmup))
            bare.append(run_bare(cfg, images, args.steps, args.warmup))
        ratios = " ".join(f"{o / b:.3f}" for o, b in zip(ours, bare))
        print(f"| {name} | {args.batch} | {statistics.median(ours):.0f} | {statistics.median(bare):.0f} | "
              f"{statistics.median(ours) / statistics.median(bare):.3f} | {ratios} |", flush=True)


if __name__ == "__main__":
    main()
