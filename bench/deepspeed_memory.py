"""Bytes of parameters, gradients and optimizer state each rank holds, per ZeRO stage, for
DCGAN-64 (pytorch/examples' size: 64 px RGB, 64 base channels, latent 100) under
train.backend=deepspeed. Counted from the engines' own tensors (parallel.zero.memory_per_rank)
after a second backward pass, when Adam's state exists and the gradients are still held, plus
ZeRO's reduction buckets at their largest during the backward passes (parallel.zero.watch_buckets);
peak GPU memory is added when a GPU is at hand.

    python bench/deepspeed_memory.py [--nproc 2] [--precision no|bf16] [--buckets sized|deepspeed] [key=value ...]

--buckets deepspeed measures DeepSpeed's own default bucket sizes (5e8 elements) instead of
the ones gan_dist sizes to each network (parallel.zero.bucket_sizes): the before and after.

It relaunches itself under torchrun with --nproc processes (gloo on CPU) and prints a
markdown table from rank 0.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (3, 64, 64)
MB = 2**20


def measure(stage: int, precision: str, overrides: list[str], accelerator) -> dict:
    from gan_dist import parallel
    from gan_dist.config import load_config
    from gan_dist.models import build_models
    from gan_dist.parallel.zero import DeepSpeedBackend, memory_per_rank, watch_buckets
    from gan_dist.run import build_optimizers

    cfg = load_config(None, ["model.name=dcgan", "model.latent_dim=100", "train.batch_size=64",
                             "train.backend=deepspeed", f"deepspeed.zero_stage={stage}",
                             f"train.mixed_precision={precision}", *overrides])
    per_device = parallel.batch_per_device(cfg.train.batch_size, accelerator.num_processes, 1)
    torch.manual_seed(0)
    G, D = build_models(cfg.model, SHAPE, 0)
    backend = DeepSpeedBackend(cfg, accelerator, G, D, *build_optimizers(cfg, G, D), per_device)
    buckets = {name: watch_buckets(engine) for name, engine in backend.engines.items()}
    device = accelerator.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    memory = {}
    for step in range(2):
        z = torch.randn(per_device, cfg.model.latent_dim, device=device)
        real = torch.rand(per_device, *SHAPE, device=device) * 2 - 1
        with torch.no_grad():
            fake = backend.forward["G"](z)
        logits = torch.cat([backend.forward["D"](real), backend.forward["D"](fake)]).float()
        loss = torch.nn.functional.softplus(torch.cat([-logits[:per_device], logits[per_device:]])).mean()
        backend.zero_grad("D")
        backend.backward("D", loss)
        memory["D"] = memory_per_rank(backend.engines["D"])
        backend.step("D", 0.0, None)
        with parallel.frozen(list(backend.raw["D"].parameters())):
            loss = torch.nn.functional.softplus(-backend.forward["D"](backend.forward["G"](z)).float()).mean()
            backend.zero_grad("G")
            backend.backward("G", loss)
        memory["G"] = memory_per_rank(backend.engines["G"])
        backend.step("G", 0.0, None)
    for name in ("G", "D"):
        memory[name]["buckets"] = buckets[name]["bytes"]
    if device.type == "cuda":
        memory["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
    return memory


def deepspeed_default_buckets() -> list[str]:
    """Overrides that give both engines DeepSpeed's default bucket sizes (what gan_dist replaced)."""
    import json

    from gan_dist.parallel.zero import DEEPSPEED_DEFAULT_BUCKET

    path = Path(tempfile.mkdtemp()) / "default-buckets.json"
    path.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": DEEPSPEED_DEFAULT_BUCKET,
                                                      "allgather_bucket_size": DEEPSPEED_DEFAULT_BUCKET}}))
    return [f"deepspeed.generator_json={path}", f"deepspeed.discriminator_json={path}"]


def worker(args) -> None:
    from gan_dist import parallel

    accelerator = parallel.build_accelerator("no", Path(tempfile.mkdtemp()), tensorboard=False, backend="deepspeed")
    rows = []
    overrides = [*args.overrides, *(deepspeed_default_buckets() if args.buckets == "deepspeed" else [])]
    for stage in (0, 1, 2):
        memory = measure(stage, args.precision, overrides, accelerator)
        for net in ("G", "D"):
            m = memory[net]
            total = sum(m.values())
            rows.append(f"| {stage} | {net} | {m['parameters'] / MB:.2f} | {m['gradients'] / MB:.2f} | "
                        f"{m['optimizer_state'] / MB:.2f} | {m['master_weights'] / MB:.2f} | "
                        f"{m['buckets'] / MB:.2f} | {total / MB:.2f} |"
                        + (f" {memory['peak_gpu_bytes'] / MB:.0f} |" if "peak_gpu_bytes" in memory else ""))
    if accelerator.is_main_process:
        gpu = " peak GPU MiB |" if accelerator.device.type == "cuda" else ""
        print(f"DCGAN-64, {accelerator.num_processes} processes on {accelerator.device.type}, "
              f"precision {args.precision}, {args.buckets} buckets; MiB held by each rank\n")
        print(f"| ZeRO stage | network | parameters | gradients | Adam moments | fp32 master | buckets | total |{gpu}\n"
              f"|---|---|---|---|---|---|---|---|{'---|' if gpu else ''}")
        print("\n".join(rows), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--precision", default="no", choices=["no", "bf16", "fp16"])
    parser.add_argument("--buckets", default="sized", choices=["sized", "deepspeed"])
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    if "RANK" in os.environ:
        worker(args)
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(port), __file__, "--precision", args.precision,
               "--buckets", args.buckets, *args.overrides]
    sys.exit(subprocess.run(command, env=env, check=False).returncode)


if __name__ == "__main__":
    main()
