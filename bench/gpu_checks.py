"""The checks of bench/gpu.py for one precision, in one process:

    python bench/gpu_checks.py fp16|no|bf16 [--dry-run]

Each check prints one line as it ends, `ROW checks | check | setting | result | detail` or
`ROW speed | model | variant | img/s | peak GiB | TFLOP/s | graphs | recompiles`, which
bench/gpu.py collects into its tables; everything else it prints is the log. A check that
fails prints its row with FAILED and its traceback, and the others still run.

- fp16: host syncs per step (DCGAN-64, batch 256, R1 every 2nd D step, BatchNorm in D,
  InfoGAN's code) under torch.cuda.set_sync_debug_mode("warn"), and that run trains with
  finite losses (the scalers' overflows counted per network).
- no (fp32): fused Adam's found_inf leaves weights, moments and step counts untouched on a
  NaN step; a checkpoint written on the CPU resumes on the GPU; the real loader (synthetic
  64 px chunked shards, streamed by 2 and 12 workers, and resident on the device) feeding
  DCGAN-64; the speed rows in fp32 and the bare loop.
- bf16: host syncs per step as for fp16, then the bf16 and bf16 + channels_last + compile
  speed rows (compile last: a cold compile is the slowest thing here).

--dry-run runs every check on the CPU at toy sizes (batch 4, a few steps, quarter width, 1
and 2 loader workers); it cannot watch CUDA syncs or compile in reasonable time, and says so.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import overhead  # bench/overhead.py: the in-memory trainer run and the bare loop

MODELS = {  # name: (config, sample shape, overrides)
    "DCGAN-64": ("dcgan_mnist32.yaml", (3, 64, 64), ["model.conditional=false"]),
    "ResNet-32": ("sngan_cifar10.yaml", (3, 32, 32), ["train.n_critic=1"]),
}
LAZY_R1 = ["loss.r1_gamma=0.1", "loss.r1_interval=8"]  # runs eager beside a compiled forward
SYNC_RUN = ["loss.r1_gamma=1", "loss.r1_interval=2", "model.d_norm=batch", "model.num_latent_categories=10"]
VARIANTS = {  # precision: [(variant name, overrides)]
    "no": [("fp32, no R1", []), ("fp32", LAZY_R1)],
    "bf16": [("bf16", LAZY_R1), ("bf16+channels_last+compile", [*LAZY_R1, "train.channels_last=true",
                                                                "train.compile=true"])],
}


class Sizes:
    def __init__(self, dry_run: bool):
        self.dry_run = dry_run
        self.device = "cpu" if dry_run else "cuda"
        self.batch = 4 if dry_run else 256
        self.steps, self.warmup = (2, 2) if dry_run else (30, 15)
        self.width = ["model.width_mult=0.25"] if dry_run else ["model.width_mult=1"]
        self.workers = (1, 2) if dry_run else (2, 12)
        self.loader_images = 256 if dry_run else 8192


def row(table: str, *cells) -> None:
    print("ROW " + table + " | " + " | ".join(str(c).replace("|", "/") for c in cells), flush=True)


def checked(name: str, setting: str):
    """Run a check; an exception becomes a FAILED row (and its traceback in the log)."""
    def wrap(fn):
        def run(*args):
            start = time.perf_counter()
            try:
                fn(*args)
            except Exception as err:  # noqa: BLE001 - one broken check must not hide the others
                traceback.print_exc()
                row("checks", name, setting, f"FAILED: {type(err).__name__}: {str(err)[:200]}", "")
            print(f"[{name}: {time.perf_counter() - start:.0f} s]", flush=True)
        return run
    return wrap


def _images(shape: tuple, count: int) -> torch.Tensor:
    images = torch.randint(0, 256, (count, *shape), dtype=torch.uint8)
    return images.pin_memory() if torch.cuda.is_available() else images


def _overrides(sizes: Sizes, model_overrides: list[str], extra: list[str], precision: str) -> list[str]:
    return [*overhead.COMMON, *model_overrides, *sizes.width, f"train.batch_size={sizes.batch}",
            f"train.mixed_precision={precision}", "log.every_steps=5", *extra]


def host_syncs(sizes: Sizes, precision: str) -> None:
    """Syncs per step after the warm-up, with where they happen; the run must train finitely."""
    config, shape, model_overrides = MODELS["DCGAN-64"]
    setting = f"{precision}, DCGAN-64, batch {sizes.batch}, R1 every 2nd D step, BatchNorm D, InfoGAN code"

    @checked("host syncs per step", setting)
    def check():
        syncs = None if sizes.dry_run else []
        root = tempfile.mkdtemp()
        overrides = _overrides(sizes, model_overrides, SYNC_RUN, precision)
        overhead.run_ours(config, overrides, _images(shape, sizes.batch * 4), sizes.steps, sizes.warmup,
                          syncs=syncs, run_root=root)
        if syncs is None:
            row("checks", "host syncs per step", setting, "(dry run: CUDA syncs are not watched on a CPU)", "")
        else:
            places: dict[str, int] = {}
            for file, line, _ in syncs:
                places[f"{Path(file).name}:{line}"] = places.get(f"{Path(file).name}:{line}", 0) + 1
            top = ", ".join(f"{place} x{count}" for place, count in sorted(places.items(), key=lambda kv: -kv[1])[:4])
            row("checks", "host syncs per step", setting, f"{len(syncs) / sizes.steps:g} per step over {sizes.steps} "
                f"steps", top or "none")
        metrics = [json.loads(line) for line in next(Path(root).glob("*/metrics.jsonl")).read_text().splitlines()]
        losses = [v for record in metrics for k, v in record.items() if k.startswith("Loss/")]
        finite = all(np.isfinite(losses))
        last = metrics[-1]
        overflows = (f", fp16 overflows (the scalers' own skips while they calibrate) D "
                     f"{last.get('Skipped/D_fp16_overflow')} / G {last.get('Skipped/G_fp16_overflow')}"
                     if precision == "fp16" else "")
        row("checks", f"{precision} + R1 trains", setting,
            ("PASS" if finite else "FAILED") + f": {len(losses)} logged losses finite={finite}",
            f"skipped for non-finite gradients D {last['Skipped/D']} / G {last['Skipped/G']}{overflows}")

    check()


def found_inf_leaves_state(sizes: Sizes) -> None:
    @checked("fused Adam found_inf", f"{sizes.device}, a NaN D step")
    def check():
        from gan_dist import parallel
        from gan_dist.config import ModelConfig
        from gan_dist.models import build_models
        from gan_dist.parallel.ddp import DDPBackend

        torch.manual_seed(0)
        G, D = build_models(ModelConfig(name="dcgan", width_mult=0.25, g_norm="none"), (3, 32, 32), 0)
        accelerator = parallel.build_accelerator("no", Path(tempfile.mkdtemp()), tensorboard=False,
                                                 device=sizes.device)
        backend = DDPBackend(accelerator, G, D, torch.optim.Adam(G.parameters(), fused=True),
                             torch.optim.Adam(D.parameters(), fused=True))
        real = torch.rand(8, 3, 32, 32, device=accelerator.device)

        def d_step(factor: float):
            backend.zero_grad("D")
            backend.backward("D", backend.forward["D"](real).float().mean() * factor)
            return backend.step("D", 0.0, None)

        d_step(1.0)
        weights = [p.detach().clone() for p in backend.params["D"]]
        state = copy.deepcopy(backend.optimizers["D"].state_dict()["state"])
        _, skipped, _ = d_step(float("nan"))
        same = all(torch.equal(a, b) for a, b in zip(weights, backend.params["D"]))
        for index, now in backend.optimizers["D"].state_dict()["state"].items():
            same &= all(torch.equal(now[key], state[index][key]) for key in ("step", "exp_avg", "exp_avg_sq"))
        row("checks", "fused Adam found_inf", f"{sizes.device}, a NaN D step",
            "PASS" if same and bool(skipped) else "FAILED",
            f"skipped={bool(skipped)}, weights, exp_avg, exp_avg_sq and step untouched={same}")

    check()


def _fresh_accelerate_state() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _digits_shards() -> Path:
    from gan_dist.data.prepare import write_shards
    from gan_dist.data.sources import digits

    return write_shards(digits(), Path(tempfile.mkdtemp()) / "digits", shard_size=256)


def cpu_checkpoint_resumes_here(sizes: Sizes) -> None:
    setting = f"tiny MLP: 10 steps with train.device=cpu, then 10 more with train.device=auto ({sizes.device})"

    @checked("CPU checkpoint resumes", setting)
    def check():
        from gan_dist.train import train

        root, data = tempfile.mkdtemp(), _digits_shards()
        base = [f"data.path={data}", f"run.root={root}", "log.every_steps=5", "train.total_kimg=1"]
        checkpoints = Path(root) / "tiny" / "checkpoints"
        devices = []
        for leg in (["train.device=cpu", "train.max_steps=10"], ["train.max_steps=20"]):
            # accelerate keeps one device per process: each leg starts from a fresh state,
            # as a new job would.
            _fresh_accelerate_state()
            train(str(overhead.ROOT / "configs" / "tiny.yaml"), [*base, *leg])
            devices.append(json.loads((checkpoints / (checkpoints / "latest").read_text().strip()
                                       / "state.json").read_text()))
        _fresh_accelerate_state()
        first, last = devices
        ok = first["device"] == "cpu" and last["device"] == sizes.device and last["progress"]["step"] == 20
        row("checks", "CPU checkpoint resumes", setting, "PASS" if ok else "FAILED",
            f"step {first['progress']['step']} on {first['device']}, then step {last['progress']['step']} "
            f"on {last['device']}")

    check()


def real_loader(sizes: Sizes) -> None:
    """DCGAN-64 fed by make_loader from synthetic 64 px npy shards: img/s and data wait."""
    from gan_dist.data.prepare import write_shards
    from gan_dist.data.sources import ArraySource

    shape = MODELS["DCGAN-64"][1]
    shards = Path(tempfile.mkdtemp()) / "synthetic64"
    rng = np.random.default_rng(0)
    samples = rng.integers(0, 256, (sizes.loader_images, *shape), dtype=np.uint8)
    write_shards(ArraySource(samples, np.zeros(len(samples), np.int64), [], "synthetic 64 px"), shards,
                 shard_size=512, workers=4)
    setting = f"DCGAN-64 fp32, batch {sizes.batch}, {sizes.loader_images} synthetic 64 px npy images"
    readings = [(f"{workers} worker(s), streamed", ["data.resident=off", f"data.num_workers={workers}"])
                for workers in sizes.workers] + [("resident on the device", ["data.resident=device"])]
    for what, reading in readings:
        checked(f"real loader, {what}", setting)(_loader_row)(sizes, shards, what, reading, setting)


def _loader_row(sizes: Sizes, shards: Path, what: str, reading: list[str], setting: str) -> None:
    from gan_dist.train import train

    config, _, model_overrides = MODELS["DCGAN-64"]
    root = tempfile.mkdtemp()
    steps = sizes.warmup + sizes.steps
    train(str(overhead.ROOT / "configs" / config),
          [*model_overrides, *sizes.width, f"data.path={shards}", *reading,
           f"run.root={root}", f"train.batch_size={sizes.batch}", f"train.max_steps={steps}",
           f"log.every_steps={max(1, steps // 3)}", "log.sample_every_kimg=1e9", "checkpoint.every_kimg=0"])
    last = json.loads(next(Path(root).glob("*/metrics.jsonl")).read_text().splitlines()[-1])
    row("checks", f"real loader, {what}", setting, f"{last['Speed/img_per_s']:,.0f} img/s",
        f"data wait {last['Speed/data_wait_fraction']:.0%} of the last interval")


def flops_per_image(cfg, shape: tuple, device) -> float:
    """FLOPs of one D step and one G step (forward + backward), per real image."""
    from torch.utils.flop_counter import FlopCounterMode

    from gan_dist.models import build_models

    G, D = (m.to(device) for m in build_models(cfg.model, shape, 0))
    z = torch.randn(2, cfg.model.latent_dim, device=device)
    real = torch.rand(2, *shape, device=device)
    with FlopCounterMode(display=False) as counter:
        fake = G(z)
        (D(real).mean() + D(fake.detach()).mean()).backward()
        D(G(z)).mean().backward()
    return counter.get_total_flops() / 2


def speed(sizes: Sizes, model: str, variant: str, extra: list[str], precision: str, bare: bool = False) -> None:
    @checked(f"speed {model} {variant}", "")
    def check():
        from gan_dist.config import load_config

        config, shape, model_overrides = MODELS[model]
        overrides = _overrides(sizes, model_overrides, extra, precision)
        flops = flops_per_image(load_config(str(overhead.ROOT / "configs" / config), overrides), shape, sizes.device)
        compiled = "train.compile=true" in extra
        if compiled and sizes.dry_run:
            row("speed", model, variant, "(dry run: compiled on a GPU only)", "-", f"{flops / 1e9:.2f} GFLOP/img", "-", "-")
            return
        import torch._dynamo

        torch._dynamo.reset()
        counters = torch._dynamo.utils.counters
        counters.clear()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        images = _images(shape, sizes.batch * 4)
        at_warmup = {}
        if bare:
            cfg = load_config(str(overhead.ROOT / "configs" / config), overrides)
            img_per_s = overhead.run_bare(cfg, images, sizes.steps, sizes.warmup, device=sizes.device)
        else:
            img_per_s = overhead.run_ours(config, overrides, images, sizes.steps, sizes.warmup,
                                          after_warmup=lambda: at_warmup.update(counters["stats"]))
        peak = f"{torch.cuda.max_memory_allocated() / 2**30:.2f}" if torch.cuda.is_available() else "-"
        # Graphs made during the warm-up are the compile; any made after it are recompiles.
        graphs, warm = counters["stats"]["unique_graphs"], at_warmup.get("unique_graphs", 0)
        breaks = sum(counters["graph_break"].values())
        row("speed", model, variant, f"{img_per_s:,.0f}" + (" (dry run)" if sizes.dry_run else ""), peak,
            f"{flops * img_per_s / 1e12:.2f}", f"{warm} ({breaks} graph breaks)" if compiled else "-",
            graphs - warm if compiled else "-")

    check()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("precision", choices=["fp16", "no", "bf16"])
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args()
    sizes = Sizes(args.dry_run)
    # Every temporary directory of the checks (runs, shards) lives in one, removed at the end.
    with tempfile.TemporaryDirectory(prefix="gan_dist-gpu-check-") as work:
        tempfile.tempdir = work
        run_checks(sizes, args.precision)


def run_checks(sizes: Sizes, precision: str) -> None:
    if precision in ("fp16", "bf16"):
        host_syncs(sizes, precision)
    if precision == "no":
        found_inf_leaves_state(sizes)
        cpu_checkpoint_resumes_here(sizes)
        real_loader(sizes)
        speed(sizes, "DCGAN-64", "bare loop fp32, no R1", [], "no", bare=True)
    for variant, extra in VARIANTS.get(precision, []):  # compile, the slowest, last
        for model in MODELS:
            if variant == "fp32, no R1" and model != "DCGAN-64":
                continue  # the bare loop's counterpart
            speed(sizes, model, variant, extra, precision)


if __name__ == "__main__":
    main()
