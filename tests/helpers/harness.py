"""Many training cases in one launch: the distributed tests' harness (test-only).

    torchrun --nproc_per_node 2 harness.py DIGITS_DIR OUT_DIR CASE [CASE ...]
    python harness.py DIGITS_DIR OUT_DIR CASE [CASE ...]

Each case runs the product's own `train()` in this process (accelerate's state is reset
between cases, the process group stays up) and writes OUT_DIR/<case>/rank<R>.pt with the
final G, D and G_ema weights, the skip counters and the outcome ("ok" or the error).

Equivalence cases ("eq-*") run in float64 with hooks that make the run a function of the
GLOBAL batch only: every rank reads its slice of the same global real batch, and takes its
slice of the same global latents and gradient-penalty draws. 2 processes x B and
1 process x 2B (or 2 micro-batches of B) must then end with the same weights. These hooks
live here, outside the product, which draws different noise and data on every rank.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
from poison import nan_on_rank1
from tiny_extractor import TinyExtractor

from gan_dist import phases as phases_mod
from gan_dist import trainer as trainer_mod
from gan_dist.data.stream import Batch

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--config", str(ROOT / "configs" / "tiny.yaml"), "train.max_steps=5", "log.every_steps=5",
        "data.num_workers=0", "model.g_norm=none"]
EQ_SHARED = ["optim.generator.lr=2e-3", "optim.discriminator.lr=2e-3", "train.ema_half_life_kimg=0.01"]
DCGAN = ["model.name=dcgan", "model.width_mult=0.125", "data.dataset=digits", "data.resolution=16"]
NONSAT_R1 = ["loss.name=nonsaturating", "loss.r1_gamma=1", "loss.r1_interval=1"]
HINGE_NCRITIC = ["loss.name=hinge", "train.n_critic=2"]
COMPILE = ["loss.name=relativistic", "loss.r2=true", "loss.r1_gamma=1", "loss.r1_interval=2", "train.max_steps=6",
           "log.every_steps=3"]
# In float32 the compiled kernels sum in another order, and Adam turns a rounding-sized
# gradient on a near-zero element into a whole step (measured 8e-4 apart after 6 steps on
# one CI machine): float64 keeps the comparison about the graphs, not the rounding.
FLOAT64_CASES = {"compile-r1r2", "eager-r1r2"}
STREAMED = ["data.resident=off"]  # cases about reader slots, workers and storage
RESUME = [*STREAMED, "run.overwrite=false", "train.total_kimg=2", "data.num_workers=2", "checkpoint.every_kimg=0",
          "log.every_steps=7", "log.sample_every_kimg=0.3", "loss.r1_gamma=1", "loss.r1_interval=3"]

CASES = {
    "eq-mlp-r1": [*EQ_SHARED, *NONSAT_R1],
    # No data hook: the product's resident loader on the chunked digits. Its order is a function
    # of the global batch (rank r takes the r-th part of global batch k), so it needs none.
    "eq-mlp-r1-resident": [*EQ_SHARED, *NONSAT_R1, "data.resident=host"],
    "eq-mlp-hinge": [*EQ_SHARED, *HINGE_NCRITIC],
    # R3GAN's recipe: the G phase reads a real batch of its own; every schedule moves within
    # the 5 steps (0.16 kimg) and the lr's ends at 0.1 kimg.
    "eq-mlp-relativistic": [*EQ_SHARED, "loss.name=relativistic", "loss.r1_gamma=1", "loss.r2=true",
                            "loss.r1_interval=1", "loss.gamma_schedule.end=0.1", "loss.gamma_schedule.kimg=0.2",
                            "optim.generator.lr_schedule.end=2e-4", "optim.generator.lr_schedule.kimg=0.1",
                            "optim.discriminator.beta2_schedule.end=0.9", "optim.discriminator.beta2_schedule.kimg=0.2",
                            "train.ema_half_life_kimg=0", "train.ema_half_life_schedule.end=0.05",
                            "train.ema_half_life_schedule.kimg=0.2"],
    # ADA (every bgc operation and cutout) with R1 + R2 through it, p from 0.5 moving 0.1 per
    # adjustment (every 4 D steps: 2 per step here, so adjustments at steps 2 and 4).
    "eq-mlp-ada": [*EQ_SHARED, "loss.name=relativistic", "loss.r1_gamma=1", "loss.r2=true", "loss.r1_interval=1",
                   "data.augment=bgc,cutout", "data.augment_p=0.5", "data.ada_kimg=1.28", "train.n_critic=2"],
    "eq-mlp-gp": [*EQ_SHARED, "loss.name=wasserstein", "loss.gp_weight=10"],
    "eq-mlp-diffaug": [*EQ_SHARED, *NONSAT_R1, "data.diffaugment=color,translation,cutout"],
    "eq-mlp-code": [*EQ_SHARED, *NONSAT_R1, "model.num_latent_categories=4", "loss.info_weight=1"],
    "eq-dcgan-r1": [*EQ_SHARED, *DCGAN, *NONSAT_R1],
    "eq-dcgan-hinge": [*EQ_SHARED, *DCGAN, *HINGE_NCRITIC],
    # The G step on the second D step's fakes (their graph kept through that D step).
    "eq-dcgan-reuse": [*EQ_SHARED, *DCGAN, *HINGE_NCRITIC, "train.reuse_fakes=true"],
    "eq-mlp-r1-micro2": [*EQ_SHARED, *NONSAT_R1, "train.num_micro_batches=2"],
    "eq-dcgan-hinge-micro2": [*EQ_SHARED, *DCGAN, *HINGE_NCRITIC, "train.num_micro_batches=2"],
    # BatchNorm in D called on reals and fakes before one backward, lazy R1 through DDP
    # (double backward), several D steps per G step, and micro-batches with no_sync.
    "bn_d-r1-ncritic-micro": ["model.d_norm=batch", "model.g_norm=batch", "loss.r1_gamma=1",
                              "loss.r1_interval=2", "train.n_critic=2", "train.num_micro_batches=2",
                              "train.max_steps=12", "log.every_steps=4", "log.sample_every_kimg=0.2"],
    # Spectral norm's power-iteration buffers, the WGAN gradient penalty, a conditional model.
    "spectral-gp-conditional": ["model.d_norm=spectral", "loss.name=wasserstein", "loss.gp_weight=10",
                                "model.conditional=true", "train.max_steps=12"],
    # A NaN in rank 1's D loss at step 3 only: every rank must skip that D step.
    "nan-on-rank1": ["train.max_steps=8", "log.every_steps=4"],
    # Rank 1's G weights nudged after step 2: the next consistency check must catch it.
    "perturb-rank1": ["train.max_steps=8", "log.sample_every_kimg=0.1"],
    # Exact resume with 2 loader workers: 21 steps, stop, resume to 40; against 40 in one go.
    "resume-full": [*RESUME, "run.name=resume-full", "train.max_steps=40"],
    "resume-leg1": [*RESUME, "run.name=resume-split", "train.max_steps=21"],
    "resume-leg2": [*RESUME, "run.name=resume-split", "train.max_steps=40"],
    # A corrupt sample (in OUT/bad-digits, written by the test) under data.on_error=raise.
    "bad-data-raise": [*STREAMED, "data.on_error=raise", "train.max_steps=40"],
    # Rank 1 cannot read any shard (its node lost the storage): its stream gives up at once.
    "fatal-data-raise": [*STREAMED, "data.on_error=raise", "train.max_steps=20", "data.max_shard_retries=1",
                         "data.retry_backoff_s=0"],
    # torch.compile of G and D under DDP against the same run eager: the relativistic loss (the G
    # phase reads reals through the compiled D) with R1 + R2 (both penalties through the eager D).
    "compile-r1r2": [*COMPILE, "train.compile=true"],
    "eager-r1r2": COMPILE,
    # The resume split again, with checkpoints at steps 10, 20 and 21; in its second leg rank 1
    # reads a stale `latest` (step 10, as an NFS cache may show it): rank 0 decides for all.
    "stale-leg1": [*RESUME, "run.name=stale", "train.max_steps=21", "checkpoint.every_kimg=0.32"],
    "stale-leg2": [*RESUME, "run.name=stale", "train.max_steps=40", "checkpoint.every_kimg=0.32"],
    # Over http (test_distributed starts the servers): shard 2 is cut off half-way on its first
    # 5 requests, then served; 130 steps of 2 x 16 take every slot through two epochs (so
    # every failure and retry, in whichever epoch it came, has reached metrics.jsonl).
    "http-flaky": [*STREAMED, "data.num_workers=2", "data.shuffle_buffer=16", "data.retry_backoff_s=0.05",
                   "train.total_kimg=5", "train.max_steps=130", "log.every_steps=10"],
    # Shard 2 is cut off on every request, under data.on_error=skip: both ranks stop together.
    "http-lost": [*STREAMED, "data.num_workers=2", "data.retry_backoff_s=0.05", "data.max_shard_retries=2", "train.total_kimg=7",
                  "train.max_steps=200",
                  "log.every_steps=5"],
}
HTTP_CASES = {"http-flaky": "GAN_DIST_TEST_FLAKY_URL", "http-lost": "GAN_DIST_TEST_LOST_URL"}


class GlobalDraws:
    """Per phase, one global draw of latents, GP mixing weights and DiffAugment parameters;
    each rank takes its slice."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.world, self.rank = trainer.acc.num_processes, trainer.acc.process_index
        self.micro = trainer.cfg.train.num_micro_batches
        self.gen = torch.Generator().manual_seed(1234)
        self.calls, self.slot, self.phase, self.alpha_phase, self.augment_calls = 0, 0, -1, -1, 0
        self.z = self.alpha = None
        self.augment = trainer.augment.before_d
        self.current, self.augmented = "D", {"D": 0, "G": 0}  # this rank's images changed, per phase

    def noise(self, count: int):
        index = self.calls % self.micro
        if index == 0:
            self.phase += 1
            self.z = torch.randn(self.world * self.micro * count, self.trainer.cfg.model.latent_dim, generator=self.gen)
        # Rank-major slots, matching how each rank's real batch is cut into micro-batches.
        self.slot, self.calls, self.augment_calls = self.rank * self.micro + index, self.calls + 1, 0
        return self.z[self.slot * count:(self.slot + 1) * count].to(self.trainer.acc.device), None

    def before_d(self, x):
        """DiffAugment of the global batch (this rank's rows in its slot, zeros elsewhere), sliced.

        Every augmentation draws per sample in order, so a generator seeded by (phase, call)
        gives global row j the same parameters whatever the number of ranks and micro-batches.
        """
        count = x.shape[0]
        self.trainer.augment.gen.manual_seed(1000 * self.phase + self.augment_calls)
        self.augment_calls += 1
        rows = self.world * self.micro * count
        before = x.new_zeros(self.slot * count, *x.shape[1:])
        after = x.new_zeros(rows - (self.slot + 1) * count, *x.shape[1:])
        out = self.augment(torch.cat([before, x, after]))[self.slot * count:(self.slot + 1) * count]
        self.augmented[self.current] += int((out != x).flatten(1).any(1).sum())
        return out

    def in_phase(self, name: str, phase):
        def run(*args, **kwargs):
            self.current = name
            return phase(*args, **kwargs)

        return run

    def interpolate(self, real, fake, generator):
        count = real.shape[0]
        if self.alpha_phase != self.phase:
            shape = (self.world * self.micro * count,) + (1,) * (real.dim() - 1)
            self.alpha, self.alpha_phase = torch.rand(shape, generator=self.gen, dtype=real.dtype), self.phase
        alpha = self.alpha[self.slot * count:(self.slot + 1) * count].to(real.device)
        return (alpha * real.detach() + (1 - alpha) * fake.detach()).requires_grad_(True)


def global_batches(trainer, images: np.ndarray):
    """Rank r's slice of global batch k: rows k*B .. k*B+B of the data (cycled)."""
    global_batch = trainer.cfg.train.batch_size
    per_rank = global_batch // trainer.acc.num_processes
    start = trainer.acc.process_index * per_rank
    for k in range(10**9):
        rows = (k * global_batch + np.arange(start, start + per_rank)) % len(images)
        yield Batch(torch.from_numpy(images[rows]), torch.zeros(per_rank, dtype=torch.int64),
                    [str(r) for r in rows])


def _state(module) -> dict:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


CURRENT: dict = {}
_fit = trainer_mod.Trainer.fit
_interpolate = phases_mod.interpolate


def _perturb_rank1_after_step2(trainer) -> None:
    g_phase = trainer.g_phase

    def nudged(*args):
        g_phase(*args)
        if trainer.progress.step == 1 and trainer.acc.process_index == 1:  # step counter moves after g_phase
            with torch.no_grad():
                next(trainer.G_raw.parameters()).add_(1e-3)

    trainer.g_phase = nudged


def fit(self) -> None:
    case = CURRENT["case"]
    CURRENT["ada_p"] = []
    if case.startswith("eq-"):
        draws = CURRENT["draws"] = GlobalDraws(self)
        self._noise = draws.noise
        self.augment.before_d = draws.before_d
        self.d_phase, self.g_phase = draws.in_phase("D", self.d_phase), draws.in_phase("G", self.g_phase)
        _record_ada(self)
        phases_mod.interpolate = draws.interpolate
        if "data.resident=host" not in CASES[case]:
            self.data = global_batches(self, CURRENT["images"])
    elif case == "nan-on-rank1":
        nan_on_rank1(self)
    elif case == "perturb-rank1":
        _perturb_rank1_after_step2(self)
    consumed = []  # (worker, keys) of every batch this rank trained on, in order
    account = self.data_health.account
    self.data_health.account = lambda batch: consumed.append((batch.worker, np.asarray(batch.keys).tolist())) or account(batch)
    initial_G = _state(self.G_raw)
    try:
        _fit(self)
    finally:
        phases_mod.interpolate = _interpolate
        CURRENT["state"] = {"G0": initial_G, "G": _state(self.G_raw), "D": _state(self.D_raw), "G_ema": _state(self.ema.module),
                            "skipped": dict(self.progress.num_skipped), "step": self.progress.step,
                            "graphs": _graphs_compiled(), "consumed": consumed,
                            "broadcast_buffers": [getattr(m, "broadcast_buffers", None) for m in self.backend.ddp.values()],
                            "augmented": CURRENT["draws"].augmented if case.startswith("eq-") else {},
                            "ada_p": CURRENT.get("ada_p", [])}


trainer_mod.Trainer.fit = fit


def _record_ada(trainer) -> None:
    """ADA's p after each adjustment, in CURRENT["ada_p"]."""
    CURRENT["ada_p"] = []
    if trainer.ada is None:
        return
    adjust = trainer.ada.adjust

    def recorded(reduce_sum):
        adjust(reduce_sum)
        CURRENT["ada_p"].append(trainer.ada.p.item())

    trainer.ada.adjust = recorded


def _graphs_compiled() -> int:
    """Graphs torch.compile has made in this process so far (0 when it never ran)."""
    import sys

    dynamo = sys.modules.get("torch._dynamo.utils")
    return int(dynamo.counters["stats"]["unique_graphs"]) if dynamo is not None else 0


def evaluate_case(digits8: str, out: str, world: int) -> dict:
    """FID/KID/IS with the tiny extractor and cls with the real classifier, for a seeded G."""
    from gan_dist import parallel
    from gan_dist.config import ModelConfig
    from gan_dist.data.stream import open_dataset
    from gan_dist.eval import classifier
    from gan_dist.eval.run import EvalOptions, Target, evaluate
    from gan_dist.models import build_models

    # Both launches train the same seeded classifier; what is compared is how the ranks
    # split and gather the work, so a briefly trained one does (and saves a minute a launch).
    classifier.EPOCHS, classifier.MIN_STEPS = 1, 30
    accelerator = parallel.build_accelerator("no", Path(out), tensorboard=False)
    data = open_dataset(digits8)
    torch.manual_seed(0)
    G, _ = build_models(ModelConfig(name="mlp", width_mult=0.125, latent_dim=16), data.shape, 0)
    opts = EvalOptions(metrics=["fid", "kid", "is", "cls"], num=301, batch=40,
                       cache_dir=f"{out}/eval-cache-w{world}")
    target = Target(G.eval(), 16, 0, data, "digits")
    first = evaluate(target, opts, accelerator, {"inception": TinyExtractor()})
    # Again, now from the cache that rank 0 wrote: only rank 0 reads it.
    return {**first, "again": evaluate(target, opts, accelerator, {"inception": TinyExtractor()})}


@contextmanager
def storage_lost():
    """Every shard this process opens fails at its first byte (a node that lost the storage)."""
    from gan_dist.data import stream

    read_piece = stream.read_piece

    def unreadable(url, *args, **kwargs):
        raise stream.ReadFailure(f"{url}: unreadable after key (none) (OSError: connection reset)")
        yield  # a generator, as read_piece is

    stream.read_piece = unreadable
    try:
        yield
    finally:
        stream.read_piece = read_piece


@contextmanager
def stale_latest(name: str):
    """This process reads every checkpoints/latest as naming `name` (a stale file-system cache)."""
    read_text = Path.read_text

    def stale(self, *args, **kwargs):
        return f"{name}\n" if self.name == "latest" else read_text(self, *args, **kwargs)

    Path.read_text = stale
    try:
        yield
    finally:
        Path.read_text = read_text


def main() -> None:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    # The process group outlives each case: end_training would destroy it, and a second
    # rendezvous on the launcher's store does not complete.
    Accelerator.end_training = lambda self: [tracker.finish() for tracker in self.trackers]

    from gan_dist.data.sources import digits
    from gan_dist.train import train

    digits8, digits16, out = sys.argv[1:4]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    images = {False: digits().samples, True: digits(16).samples}
    for case in sys.argv[4:]:
        if case == "eval":
            torch.set_default_dtype(torch.float32)
            rank = int(os.environ.get("RANK", "0"))
            (Path(out) / case).mkdir(parents=True, exist_ok=True)
            torch.save(evaluate_case(digits8, out, world), Path(out) / case / f"w{world}-rank{rank}.pt")
            AcceleratorState._reset_state(reset_partial_state=True)
            continue
        dcgan = "model.name=dcgan" in CASES[case]
        torch.set_default_dtype(torch.float64 if case.startswith("eq-") or case in FLOAT64_CASES else torch.float32)
        CURRENT.update(case=case, images=images[dcgan], state={})
        data = f"{out}/bad-digits" if case == "bad-data-raise" else digits16 if dcgan else digits8
        data = f"{os.environ[HTTP_CASES[case]]}/index.json" if case in HTTP_CASES else data
        overrides = [*TINY[2:], f"data.path={data}", f"run.root={out}/runs",
                     f"run.name={case}-w{world}", "run.overwrite=true", *CASES[case]]
        rank1 = int(os.environ.get("RANK", "0")) == 1
        faults = {"stale-leg2": lambda: stale_latest("step_00000010"), "fatal-data-raise": storage_lost}
        try:
            with faults[case]() if rank1 and case in faults else nullcontext():
                train(TINY[1], overrides)
            outcome = "ok"
        except Exception as err:  # noqa: BLE001 - the test reads the outcome
            outcome = f"{type(err).__name__}: {err}"
        rank = int(os.environ.get("RANK", "0"))
        (Path(out) / case).mkdir(parents=True, exist_ok=True)
        torch.save({**CURRENT["state"], "outcome": outcome, "world_size": world},
                   Path(out) / case / f"w{world}-rank{rank}.pt")
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


if __name__ == "__main__":
    main()
