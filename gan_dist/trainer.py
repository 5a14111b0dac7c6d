"""The training loop: n_critic D phases, one G phase (phases.py), EMA, statistics, grids.

Time is counted in real images shown to D (kimg) and in G steps; the data position in
batches read, which a G phase that reads reals (the relativistic loss) also moves. Every
scheduled value (schedules.py) is computed once per step from the kimg clock.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gan_dist import chaos, parallel, schedules
from gan_dist.augment import DIFFAUG_PURPOSE, FLIP_PURPOSE, AdaptiveP, Augment
from gan_dist.config import to_dict as config_to_dict
from gan_dist.console import format_elapsed
from gan_dist.data.health import DataHealth
from gan_dist.data.stream import STREAM_FORMAT, Batch, DatasetInfo
from gan_dist.ema import EMA
from gan_dist.errors import UserError
from gan_dist.eval.periodic import PeriodicEval
from gan_dist.losses import AdversarialLoss
from gan_dist.phases import Phases
from gan_dist.preempt import REQUEUE_MARKER, write_requeue_marker
from gan_dist.resume import mark_finished, save_checkpoint
from gan_dist.seeds import derive_seed
from gan_dist.stats import Stats
from gan_dist.visual import replace_latest, save_samples
from gan_dist.watchdog import StepWatchdog

NOISE_PURPOSE, PENALTY_PURPOSE, FIXED_PURPOSE = 10, 11, 12
FP16_DIVERGED_SCALE = 2.0**-10
MAX_ROLLBACKS_IN_ROW = 3


class NonFiniteLossError(FloatingPointError):
    """Raised in --debug mode at the first NaN/Inf loss, naming the phase and step."""


class TrainingDivergedError(UserError):
    """Too many optimizer steps in a row skipped for non-finite gradients."""


class RollbackRequested(Exception):
    """train.rollback_on_divergence: go back to the latest checkpoint (every rank decides alike)."""


@dataclass
class Progress:
    step: int = 0
    """G steps (iterations) done."""
    num_d_steps: int = 0
    """D steps done; each showed one global batch of real images to D."""
    num_batches: int = 0
    """Batches read from the data (D steps, and G steps of a loss that reads reals): the data position."""
    last_log_images: int = 0
    last_log_time: float = field(default_factory=time.perf_counter)
    data_wait_s: float = 0.0
    num_skipped: dict = field(default_factory=lambda: {"G": 0, "D": 0})
    """Optimizer steps skipped for non-finite (synchronised) gradients, per network, since the start."""
    num_fp16_overflows: dict = field(default_factory=lambda: {"G": 0, "D": 0})
    """Steps the fp16 grad scaler skipped while calibrating its scale, since the start."""
    num_skipped_in_row: dict = field(default_factory=lambda: {"G": 0, "D": 0})
    """Per network: a network that alone keeps failing must still stop the run."""
    num_skipped_at_last_log: int = 0
    num_rollbacks: int = 0
    """train.rollback_on_divergence: returns to the latest checkpoint, since the start."""
    num_rollbacks_in_row: int = 0
    last_checkpoint_monotonic_s: float = field(default_factory=time.monotonic)

    COUNTERS = ("step", "num_d_steps", "num_batches", "num_skipped", "num_fp16_overflows", "num_skipped_in_row",
                "num_rollbacks")

    def counters(self) -> dict:
        """What a checkpoint keeps: the same on every rank."""
        return {name: getattr(self, name) for name in self.COUNTERS}

    def restore(self, counters: dict) -> None:
        for name in self.COUNTERS:
            setattr(self, name, counters.get(name, 0))
        if "num_batches" not in counters:  # before G phases read data, one batch per D step
            self.num_batches = self.num_d_steps
        self.num_skipped_at_last_log = sum(self.num_skipped.values())


def _read_flags(pending: list) -> list[tuple[bool, bool]]:
    """(skipped, overflow) of each pending step: the device flags read in one transfer, the
    host ones as they are (no tensor is built for them)."""
    on_device = [flag.reshape(()).bool() for *_, s, o in pending for flag in (s, o) if torch.is_tensor(flag)]
    values = iter(torch.stack(on_device).tolist() if on_device else [])
    return [tuple(bool(next(values)) if torch.is_tensor(flag) else bool(flag) for flag in (s, o))
            for *_, s, o in pending]


class Trainer(Phases):
    def __init__(self, cfg, accelerator, backend, ema: EMA, loss: AdversarialLoss, data, info: DatasetInfo,
                 console, run_dir: Path, debug: bool = False):
        """`backend` (parallel.build_backend) owns G's and D's forward modules, backward passes and
        optimizer steps; `accelerator` the processes and collectives."""
        self.cfg, self.acc, self.debug = cfg, accelerator, debug
        self.backend, self.ema = backend, ema
        self.G, self.D = backend.forward["G"], backend.forward["D"]
        self.D_eager = backend.eager["D"]  # R1 and GP need a double backward (never compiled)
        self.loss, self.data, self.info, self.console, self.run_dir = loss, data, info, console, run_dir
        self.num_classes = info.num_classes if cfg.model.conditional else 0
        self.batch_per_device = parallel.batch_per_device(cfg.train.batch_size, accelerator.num_processes,
                                                      cfg.train.num_micro_batches)
        self.total_images = int(cfg.train.total_kimg * 1000)
        rank, device = accelerator.process_index, accelerator.device
        # Noise differs per GLOBAL rank; the fixed grid noise is the same on every rank.
        self.noise_gen = torch.Generator(device).manual_seed(derive_seed(cfg.train.seed, rank, NOISE_PURPOSE))
        self.penalty_gen = torch.Generator(device).manual_seed(derive_seed(cfg.train.seed, rank, PENALTY_PURPOSE))
        fixed_gen = torch.Generator().manual_seed(derive_seed(cfg.train.seed, 0, FIXED_PURPOSE))
        self.fixed_z = torch.randn(cfg.log.num_samples, cfg.model.latent_dim, generator=fixed_gen).to(device)
        self.fixed_labels = (torch.arange(cfg.log.num_samples, device=device) % self.num_classes
                             if self.num_classes else None)
        self.G_raw, self.D_raw = backend.raw["G"], backend.raw["D"]
        # float32 (float64 in the equivalence tests; bf16/fp16 under DeepSpeed's half precision)
        self.dtype = next(self.D_raw.parameters()).dtype
        self.params = {"G": [p for p in self.G_raw.parameters() if p.requires_grad],
                       "D": [p for p in self.D_raw.parameters() if p.requires_grad]}
        self.augment = Augment(cfg.data.hflip, cfg.data.diffaugment, cfg.train.seed, rank, device, cfg.data.augment)
        self.ada = AdaptiveP.from_config(cfg, loss, device) if cfg.data.ada_kimg > 0 else None
        self.values = schedules.values_at(cfg, 0)  # this step's scheduled values (lr, beta2, gamma, ...)
        self.config_dict = config_to_dict(cfg)
        self.stream_workers = {}  # this rank's data position: worker -> (epoch, records read, storage failures)
        self.data_spec = getattr(getattr(data, "dataset", None), "spec", None)  # a stream's (not a test's batches)
        self.data_mode = getattr(data, "data_mode", STREAM_FORMAT)  # as resume.layout records it
        self.checkpoint_due = False
        # The newest checkpoint this run committed or resumed from (rollbacks return to it).
        self.last_checkpoint: Path | None = None
        self.elapsed_before_s, self.start_time = 0.0, time.perf_counter()
        self.stop_request = None  # set by train(): SIGTERM/SIGUSR1 handling
        self.stats = Stats()
        self.data_health = DataHealth(cfg.data.on_error, accelerator, console)
        self._last_real = None  # this rank's last real batch, a stand-in while a stop is voted on
        self.progress = Progress()
        # (network, step, skipped) of each optimizer step not yet counted, in the order they ran;
        # `skipped` may be a device tensor (fused Adam decides on the device), read once per log interval.
        self.pending_skips = []
        self.kept_fakes = None  # (fakes with G's graph, z, labels) from the last D step, for train.reuse_fakes
        self.periodic_eval = PeriodicEval(cfg, run_dir)

    # ----------------------------------------------------------------- the loop
    def fit(self) -> None:
        # A rank that hangs (a stuck collective, a dead data worker) prints where it is and
        # exits, on every rank, before the collectives' own timeout.
        with StepWatchdog(self.cfg.dist.timeout_s, self.acc.process_index, parallel.stack_dump_file()) as watchdog:
            self.watchdog = watchdog
            self._fit()

    def _fit(self) -> None:
        batches = iter(self.data)
        self.start_time = self.progress.last_log_time = time.perf_counter()
        self.console.start(self.num_images, self.progress.step, self.elapsed_before_s)
        try:
            self.watchdog.arm("the first sample grid")
            self.sample_grid()  # the untrained G_ema, as step 0
            while not self._done():
                self.watchdog.arm(f"step {self.progress.step + 1}")
                images_before = self.num_images
                try:
                    self._step_once(batches)
                    self._at_intervals(images_before)  # skips are counted here, at log and checkpoint
                    stop_signal = self.stop_request.decided(self.acc, self.progress.step) if self.stop_request else ""
                    if stop_signal or self._done():
                        self.settle_skips()  # the last chance to roll back before the final checkpoint
                except RollbackRequested as why:
                    self._rollback(str(why))
                    continue
                if stop_signal:
                    self._stop_for(stop_signal)
                    return
            self.watchdog.arm("the final grid and snapshot")
            self._finish()
        finally:
            self.console.close()
            # Loader workers ignore SIGTERM (a launcher's TERM must not kill them before the
            # checkpoint), so multiprocessing's exit-time terminate() cannot stop them: shut
            # them down through the DataLoader's own protocol, now.
            shutdown = getattr(batches, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()

    @property
    def num_images(self) -> int:
        """Real images shown to D so far, summed over ranks (the kimg clock)."""
        return self.progress.num_d_steps * self.cfg.train.batch_size

    def _done(self) -> bool:
        max_steps = self.cfg.train.max_steps
        return self.num_images >= self.total_images or (max_steps > 0 and self.progress.step >= max_steps)

    def _at_intervals(self, images_before: int) -> None:
        self.console.advance(self.num_images, self.progress.step)
        if self.progress.step % self.cfg.log.every_steps == 0:
            self.log()
        interval = max(1, int(self.cfg.log.sample_every_kimg * 1000))
        if self.num_images // interval > images_before // interval:
            self.watchdog.arm(f"the sample grid after step {self.progress.step}")
            self.sample_grid()
        # The evaluation before the checkpoint of its step: a run killed while it evaluates then
        # resumes from an earlier checkpoint and evaluates this step again, instead of resuming
        # past it with the evaluation lost.
        if self.periodic_eval.due(images_before, self.num_images):
            self.periodic_eval.run(self)
        every = int(self.cfg.checkpoint.every_kimg * 1000)
        if (every and self.num_images // every > images_before // every) or self.checkpoint_due:
            self.checkpoint()

    def checkpoint(self) -> Path:
        """Every rank, same step: buffers synced and checked first (as for a grid), then saved."""
        self.watchdog.arm(f"the checkpoint after step {self.progress.step}")
        self.data_health.settle()  # no checkpoint holds a step trained after a bad sample under raise
        self.settle_skips()  # the checkpoint's counters are the real ones (this may roll back instead)
        self.sync_buffers()
        parallel.check_rank_consistency(self.acc, {"G": self.G_raw, "D": self.D_raw, "G_ema": self.ema.module})
        path = save_checkpoint(self)
        self.console.note(f"checkpoint {path} (step {self.progress.step}, {self.num_images / 1000:.1f} kimg)")
        self.checkpoint_due, self.progress.last_checkpoint_monotonic_s = False, time.monotonic()
        self.progress.num_rollbacks_in_row = 0  # a new checkpoint: training got past the last trouble
        return path

    def _step_once(self, batches) -> None:
        chaos.point("step")
        self.values = schedules.values_at(self.cfg, self.num_images)
        self.augment.p = self.values.augment_p if self.ada is None else self.ada.p
        n_critic = self.cfg.train.n_critic
        for i in range(n_critic):
            self.d_phase(*self._next_real(batches), keep_fakes=self.cfg.train.reuse_fakes and i == n_critic - 1)
        self.g_phase(self._next_real(batches) if self.loss.g_reads_real else None)
        self.progress.step += 1
        self.ema.update(self.G_raw, self.num_images, self.cfg.train.batch_size * self.cfg.train.n_critic,
                        self.values.ema_half_life_kimg)

    def _rollback(self, why: str) -> None:
        """Back to the latest checkpoint with new noise; the data stream goes on where it is."""
        from gan_dist import resume

        checkpoint = self.last_checkpoint  # in memory, the same on every rank
        self.kept_fakes = None  # a graph of the G being rolled back must not reach a G phase
        tries = self.progress.num_rollbacks_in_row + 1
        if checkpoint is None or tries > MAX_ROLLBACKS_IN_ROW:
            reason = "no checkpoint to roll back to" if checkpoint is None else f"{MAX_ROLLBACKS_IN_ROW} rollbacks in a row"
            raise TrainingDivergedError(f"{why}, and {reason}: training has diverged. Lower the learning rates, "
                                        "add loss.r1_gamma or optim.*.grad_clip_norm")
        total = self.progress.num_rollbacks + 1
        self.pending_skips = []
        elapsed_s = self.elapsed_s()  # the time spent since the checkpoint was training time too
        resume.restore(self, checkpoint, resume.read_state(checkpoint))
        self.elapsed_before_s, self.start_time = elapsed_s, time.perf_counter()
        self.console.forget_records_after(self.progress.step)
        self.progress.num_rollbacks, self.progress.num_rollbacks_in_row = total, tries
        self.progress.num_skipped_in_row = {"G": 0, "D": 0}  # the checkpoint may have been mid-streak
        self.reseed(salt=10**6 + total)
        self.console.warn(f"{why}: rolled back to {checkpoint.name} with new noise (rollback {total})")

    def _stop_for(self, signal_name: str) -> None:
        """Preemption: checkpoint now, leave the REQUEUE marker, end the run."""
        checkpoint = self.checkpoint()
        if self.acc.is_main_process:
            write_requeue_marker(self.run_dir, signal_name, self.progress.step, checkpoint)
        # No rank exits before the marker is written: the first node whose ranks end makes
        # srun (--kill-on-bad-exit) kill the others, rank 0's node included.
        self.acc.wait_for_everyone()
        self.console.finish([(f"stopped by {signal_name} after step {self.progress.step}: checkpoint {checkpoint}, "
                             f"marker {self.run_dir / REQUEUE_MARKER}; the same command resumes it")])

    def elapsed_s(self) -> float:
        """Training time of the run, across resumes."""
        return self.elapsed_before_s + time.perf_counter() - self.start_time

    def model_info(self) -> dict:
        """model.json's content besides format and step: enough to rebuild G alone."""
        # num_classes: the classes G was built for (an unconditional G takes none, whatever the
        # data has); the data's own count is what a resume checks the data against.
        return {"model": self.config_dict["model"], "shape": list(self.info.shape), "num_classes": self.num_classes,
                "data_num_classes": self.info.num_classes, "plugins": self.cfg.plugins}

    def stream_position(self) -> dict:
        """Per worker: (epoch, records consumed, storage failures from that epoch on)."""
        from gan_dist.data.stream import stream_failures

        spec = self.data_spec
        return {"workers": {str(w): [epoch, position, stream_failures(spec, w, epoch, known) if spec else known]
                            for w, (epoch, position, known) in self.stream_workers.items()}}

    def reseed(self, salt: int) -> None:
        """New per-rank random streams (a resume with another layout): from (seed, rank, purpose, salt)."""
        seed, rank = self.cfg.train.seed, self.acc.process_index
        for purpose, gen in ((NOISE_PURPOSE, self.noise_gen), (PENALTY_PURPOSE, self.penalty_gen),
                             (FLIP_PURPOSE, self.augment.flip_gen), (DIFFAUG_PURPOSE, self.augment.gen)):
            gen.manual_seed(derive_seed(seed, rank, purpose, salt))

    def _finish(self) -> None:
        self.data_health.settle()
        self.settle_skips()
        if self.progress.step % self.cfg.log.every_steps:
            self.log()
        self.sample_grid(name="final")  # also syncs buffers across ranks before the snapshot
        snapshot = save_checkpoint(self)
        self.console.note(f"checkpoint {snapshot} (step {self.progress.step}, {self.num_images / 1000:.1f} kimg, final)")
        self.periodic_eval.run(self, snapshot)
        if self.acc.is_main_process:
            mark_finished(snapshot, self.progress.step, self.num_images / 1000)
        self.console.finish(self._closing_lines(snapshot))

    def _closing_lines(self, snapshot: Path) -> list[str]:
        samples, run = self.run_dir / "samples", self.run_dir
        lines = [(f"done: {self.progress.step} steps, {self.num_images / 1000:.1f} kimg in "
                 f"{format_elapsed(self.elapsed_s())}"),
                 f"  samples: {samples} (final grid: {samples / 'final.png'})",
                 f"  metrics: {run / 'metrics.jsonl'}", f"  weights: {snapshot}",
                 f"  plot:    gan-dist plot --run {run}   (writes {run / 'plot.png'})"]
        if self.cfg.log.tensorboard:
            lines.append(f"  tensorboard --logdir {run}")
        return lines

    def settle_skips(self) -> None:
        """Count the steps skipped since the last call (one host sync for all of them) and stop
        or roll back on too many in a row. Called at every log line, checkpoint and the end, so
        a divergence is acted on within one log interval; skipped steps change no weights."""
        if not self.pending_skips:
            return
        pending, self.pending_skips = self.pending_skips, []
        overflowed = set()
        for (name, step, _, _), (skipped, overflow) in zip(pending, _read_flags(pending)):
            if overflow:  # the fp16 scaler skipped it and lowered its scale (its own calibration)
                self.progress.num_fp16_overflows[name] += 1
                overflowed.add(name)
            if skipped:
                self._count_skip(name, step)
            else:
                self.progress.num_skipped_in_row[name] = 0
        for name in sorted(overflowed):
            self._check_fp16_scale(name)

    def _check_fp16_scale(self, name: str) -> None:
        """Calibration halves the scale from 65536 and needs a few dozen skips at most; a scale
        this small means the gradients are not finite at any scale: divergence."""
        if self.backend.loss_scale(name) < FP16_DIVERGED_SCALE:
            raise TrainingDivergedError(
                f"the fp16 grad scaler of {name} fell below {FP16_DIVERGED_SCALE:g} by step {self.progress.step}: "
                "the gradients are not finite at any scale. Lower the learning rates, add loss.r1_gamma or "
                "optim.*.grad_clip_norm, or use bf16")

    def _count_skip(self, name: str, step: int) -> None:
        """A step skipped for a non-finite gradient norm. The backend decided on the synchronised
        gradients (after DDP's all-reduce, or DeepSpeed's reduced partitions), so every rank
        counts the same skips and stops or rolls back together."""
        progress = self.progress
        progress.num_skipped[name] += 1
        progress.num_skipped_in_row[name] += 1
        limit = self.cfg.train.max_skipped_in_row
        if progress.num_skipped_in_row[name] >= limit:
            if self.cfg.train.rollback_on_divergence:
                raise RollbackRequested(f"{limit} {name} steps in a row with non-finite gradients")
            raise TrainingDivergedError(
                f"{limit} {name} optimizer steps in a row had non-finite gradients (the last at step "
                f"{step}); training has diverged. Lower the learning rates, add "
                "loss.r1_gamma or optim.*.grad_clip_norm, or raise train.max_skipped_in_row")

    # ----------------------------------------------------------------- inputs
    def _next_real(self, batches) -> tuple[torch.Tensor, torch.Tensor | None]:
        start = time.perf_counter()
        try:
            batch = next(batches)
        except StopIteration:
            if not self.data_health.stop:
                raise
            batch = Batch(None, None, [], fatal=self.data_health.stop)  # gave up: vote on until all stop
        self.progress.data_wait_s += time.perf_counter() - start
        self.progress.num_batches += 1
        if not self.data_health.account(batch):
            # This rank's stream gave up; the ranks' vote stops the run a few D steps later, and
            # until then this rank trains on its last batch so that the collectives line up.
            return self._last_real or self._blank_batch()
        self.stream_workers[batch.worker] = (batch.epoch, batch.position, batch.failures)
        x = batch.samples.to(self.acc.device, non_blocking=True)
        # uint8 images travel as bytes and become [-1, 1] floats on the device; channels_last
        # is taken in the same copy as the cast, not as a second copy of the floats.
        layout = torch.channels_last if self.cfg.train.channels_last and x.dim() == 4 else torch.preserve_format
        x = x.to(self.dtype, memory_format=layout)
        if batch.samples.dtype == torch.uint8:
            x = x.div_(127.5).sub_(1.0)
        y = batch.labels.to(self.acc.device, non_blocking=True) if self.num_classes else None
        self._last_real = (self.augment.flip_real(x), y)
        return self._last_real

    def _blank_batch(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        device = self.acc.device
        labels = torch.zeros(self.batch_per_device, dtype=torch.int64, device=device) if self.num_classes else None
        return torch.zeros(self.batch_per_device, *self.info.shape, dtype=self.dtype, device=device), labels

    def _check_finite(self, loss: torch.Tensor, phase: str) -> None:
        # A host sync per step: only in --debug, where finding the first bad step matters most.
        if self.debug and not torch.isfinite(loss).item():
            raise NonFiniteLossError(f"non-finite {phase} loss ({loss.item()}) at step {self.progress.step + 1}, "
                                     f"kimg {self.num_images / 1000:.3f}")

    # ----------------------------------------------------------------- outputs
    def log(self) -> None:
        """Every rank reduces the statistics (one collective); rank 0 records them."""
        now = time.perf_counter()
        elapsed = max(now - self.progress.last_log_time, 1e-9)
        # Reduced with the rest: the mean over ranks of the time each spent waiting for data.
        self.stats.report("Speed/data_wait_fraction", torch.tensor(min(1.0, self.progress.data_wait_s / elapsed),
                                                                   device=self.acc.device))
        self.settle_skips()
        self.data_health.settle()
        self.data_health.report(self.stats)
        if self.ada is not None:  # read with the rest, in the log's one reduction (the same on every rank)
            self.stats.report("Augment/p", self.ada.p)
            self.stats.report("Augment/signal", self.ada.signal)
        # Wall-clock checkpoints: rank 0's clock decides, and the reduce tells every rank.
        minutes = self.cfg.checkpoint.every_minutes
        due = minutes > 0 and self.acc.is_main_process and time.monotonic() - self.progress.last_checkpoint_monotonic_s > minutes * 60
        self.stats.report("Checkpoint/due", torch.tensor(float(due), device=self.acc.device))
        values = self.stats.reduce(self.acc)
        self.checkpoint_due = values.pop("Checkpoint/due") > 0
        self.data_health.after_reduce(values)
        # Skip counters are the same on every rank (decided on synchronised gradients).
        skips = {f"Skipped/{k}": v for k, v in self.progress.num_skipped.items()}
        skips["Rollbacks"] = self.progress.num_rollbacks
        if self.cfg.train.mixed_precision == "fp16":
            skips.update({f"Skipped/{k}_fp16_overflow": v for k, v in self.progress.num_fp16_overflows.items()})
        new_skips = sum(self.progress.num_skipped.values()) - self.progress.num_skipped_at_last_log
        if new_skips:
            self.console.warn(f"{new_skips} optimizer steps skipped for non-finite gradients since the last log "
                              f"line ({skips}); {self.cfg.train.max_skipped_in_row} in a row stop the run")
        self.progress.num_skipped_at_last_log += new_skips
        record = {"step": self.progress.step, "kimg": self.num_images / 1000,
                  "time_s": self.elapsed_s(), **values, **skips, **self._scheduled_values(),
                  "Speed/img_per_s": (self.num_images - self.progress.last_log_images) / elapsed}
        self.progress.last_log_images, self.progress.last_log_time, self.progress.data_wait_s = self.num_images, now, 0.0
        self.console.log(record)

    def _scheduled_values(self) -> dict:
        """The moving values of the last step, for the log (host floats, the same on every rank)."""
        if not schedules.any_moving(self.cfg):
            return {}
        v = self.values
        return {"Schedule/lr_G": v.lr["G"], "Schedule/lr_D": v.lr["D"], "Schedule/beta2_G": v.beta2["G"],
                "Schedule/beta2_D": v.beta2["D"], "Schedule/gamma": v.gamma,
                "Schedule/ema_half_life_kimg": v.ema_half_life_kimg,
                **({"Schedule/augment_p": v.augment_p} if self.ada is None else {})}  # ADA logs Augment/p

    def sync_buffers(self) -> None:
        """Every rank: make buffers identical (rank 0's) before anything reads them."""
        parallel.sync_buffers(self.acc, self.G_raw, self.D_raw)
        self.ema.copy_buffers(self.G_raw)

    @torch.no_grad()
    def sample_grid(self, name: str | None = None) -> None:
        """G_ema on the fixed noise, written by rank 0 (every rank syncs buffers and checks
        that all ranks hold bit-identical networks first)."""
        self.sync_buffers()
        parallel.check_rank_consistency(self.acc, {"G": self.G_raw, "D": self.D_raw, "G_ema": self.ema.module})
        if not self.acc.is_main_process:
            return
        samples = self.ema.module(self.fixed_z, self.fixed_labels)
        path = self.run_dir / "samples" / f"{name or f'step_{self.progress.step:08d}'}.png"
        grid = save_samples(samples, path)
        chaos.point("sample_grid")  # the grid written, latest.png not yet replaced
        replace_latest(path)
        self.console.note(f"sample grid {path} (step {self.progress.step}, {self.num_images / 1000:.1f} kimg)")
        self.console.image("samples", grid.transpose(2, 0, 1) if grid.ndim == 3 else grid[None], self.progress.step)
