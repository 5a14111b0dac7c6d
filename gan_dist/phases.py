"""The D and G phases of a training step, mixed into the Trainer (trainer.py).

A phase is a module, its optimizer, a loss and `train.num_micro_batches` micro-batches;
only the last micro-batch all-reduces gradients, and the optimizer steps once per phase.

Choices worth knowing (docs/training.md):
- Lazy R1 (and R2) are folded into the D loss every `loss.r1_interval` D steps, multiplied
  by the interval. StyleGAN2 runs R1 as a separate phase with its own optimizer step and
  corrects Adam's lr and betas for the extra steps; folding keeps one optimizer step and one
  gradient all-reduce per D phase, so no correction is needed.
- R1 is taken at the real images and R2 at the fakes D saw, each before the augmentation
  (its gradient flows through it) and R2's fakes detached from G: R2 regularises D alone.
- The fakes for the D phase are made with G in train mode under no_grad: D sees fakes
  normalised exactly as in the G phase, and they also update G's BatchNorm running
  statistics (used only by G_ema's eval-mode samples). With train.reuse_fakes the last D
  step makes them with G's graph instead, D sees them detached, and the G phase reuses them.
- A loss that compares fakes with reals (relativistic) reads a real batch of its own in the
  G phase; D's logits for it are taken under no_grad, as constants of G's loss.
"""

from __future__ import annotations

import torch

from gan_dist import chaos, parallel
from gan_dist.losses import (
    at_least_fp32,
    code_loss,
    gradient_penalty,
    interpolate,
    r1_penalty,
    r2_penalty,
)
from gan_dist.models.layers import latent_code


def lr_factor(num_images: int, total_images: int, batch_size: int, warmup_kimg: float,
              rampdown_kimg: float) -> float:
    """Learning-rate multiplier for the step that shows images num_images..num_images+batch:
    linear up over the first warmup_kimg, linear down to 0 over the last rampdown_kimg."""
    after = num_images + batch_size
    factor = 1.0
    if warmup_kimg > 0:
        factor = min(factor, after / (warmup_kimg * 1000))
    if rampdown_kimg > 0:
        factor = min(factor, max(0.0, total_images - num_images) / (rampdown_kimg * 1000))
    return factor


class Phases:
    """d_phase and g_phase; the Trainer provides cfg, backend, G, D, augment, ada, stats, progress,
    values (this step's scheduled values) and the random generators."""

    def d_phase(self, real: torch.Tensor, labels: torch.Tensor | None, keep_fakes: bool = False) -> None:
        """keep_fakes: G makes this step's fakes with its graph, and the G phase reuses them."""
        cfg = self.cfg.loss
        regularise = self.values.gamma > 0 and self.progress.num_d_steps % cfg.r1_interval == 0
        num_micro = self.cfg.train.num_micro_batches
        self.backend.zero_grad("D")
        label_chunks = labels.chunk(num_micro) if labels is not None else [None] * num_micro
        for i, (x, y) in enumerate(zip(real.chunk(num_micro), label_chunks)):
            with self.backend.micro_batch_sync("D", i, num_micro):
                loss = self._d_loss(x, y, regularise, keep_fakes)
                self._check_finite(loss, "D")
                self.backend.backward("D", loss / num_micro)
        chaos.point("d_step")  # gradients computed, not yet applied
        self._step("D", self.cfg.optim.discriminator)
        self.progress.num_d_steps += 1
        if self.ada is not None and self.progress.num_d_steps % self.ada.interval_d_steps == 0:
            self.ada.adjust(lambda totals: parallel.sum_over_ranks(self.acc, totals))
            self.augment.p = self.ada.p

    def _d_loss(self, real: torch.Tensor, labels, regularise: bool, keep_fakes: bool = False) -> torch.Tensor:
        z, fake_labels = self._noise(len(real))
        with torch.set_grad_enabled(keep_fakes):
            fake = self.G(z, fake_labels)
        if keep_fakes:  # D updates before G reads them: D learns from the fakes, G from D's answer after
            self.kept_fakes, fake = (fake, z, fake_labels), fake.detach()
        r2_due = regularise and self.cfg.loss.r2
        if regularise:
            real = real.detach().requires_grad_(True)
        if r2_due:
            fake = fake.detach().requires_grad_(True)
        real_logits = at_least_fp32((self.D_eager if regularise else self.D)(self.augment.before_d(real), labels))
        fake_logits, info = self._fake_logits_and_code_loss(fake, z, fake_labels, "D", eager=r2_due)
        if self.ada is not None:
            self.ada.observe(real_logits, fake_logits)
        loss = self.loss.d_loss(real_logits, fake_logits)
        self.stats.report("Loss/D/adversarial", loss)
        loss = loss + info
        self.stats.report("Logits/real", real_logits.mean())
        self.stats.report("Logits/fake", fake_logits.mean())
        weight = self.values.gamma / 2 * self.cfg.loss.r1_interval
        for name, due, logits, inputs in (("r1", regularise, real_logits, real), ("r2", r2_due, fake_logits, fake)):
            if due:
                penalty = (r1_penalty if name == "r1" else r2_penalty)(logits, inputs, self.backend.scaler("D"))
                self.stats.report(f"Loss/D/{name}", penalty)
                loss = loss + penalty * weight
        if self.cfg.loss.gp_weight > 0:
            mixed = interpolate(real, fake, self.penalty_gen)
            gp = gradient_penalty(at_least_fp32(self.D_eager(mixed, labels)), mixed, self.backend.scaler("D"))
            self.stats.report("Loss/D/gp", gp)
            loss = loss + self.cfg.loss.gp_weight * gp
        self.stats.report("Loss/D", loss)
        return loss

    def _fake_logits_and_code_loss(self, fake, z, fake_labels, phase: str,
                                   eager: bool = False) -> tuple[torch.Tensor, torch.Tensor | float]:
        """D's logits for fakes and, with a categorical code in z, InfoGAN's weighted code loss
        (`eager`: through the uncompiled D, for a penalty's double backward)."""
        D = self.D_eager if eager else self.D
        categories = self.cfg.model.num_latent_categories
        if not categories:
            return at_least_fp32(D(self.augment.before_d(fake), fake_labels)), 0.0
        logits, code_logits = D(self.augment.before_d(fake), fake_labels, with_code=True)
        # DeepSpeed's half-precision engines hand G a rounded z; the target is the code G read.
        seen_z = z.to(getattr(self.G, "input_dtype", z.dtype))
        info = code_loss(code_logits, latent_code(seen_z, categories))
        self.stats.report(f"Loss/{phase}/info", info)
        return at_least_fp32(logits), self.cfg.loss.info_weight * info

    def g_phase(self, real: tuple | None = None) -> None:
        """G's step; `real` (images, labels): the G phase's own real batch, for a loss that reads one."""
        num_micro = self.cfg.train.num_micro_batches
        reals = _micro_batches(real, num_micro) if real is not None else [None] * num_micro
        self.backend.zero_grad("G")
        with parallel.frozen(self.params["D"]):
            for i in range(num_micro):
                with self.backend.micro_batch_sync("G", i, num_micro):
                    fake, z, fake_labels = self._fakes_for_g(num_micro)
                    fake_logits, info = self._fake_logits_and_code_loss(fake, z, fake_labels, "G")
                    if reals[i] is None:
                        loss = self.loss.g_loss(fake_logits) + info
                    else:
                        with torch.no_grad():  # constants of G's loss: no graph for D's weights
                            real_logits = at_least_fp32(self.D(self.augment.before_d(reals[i][0]), reals[i][1]))
                        loss = self.loss.g_loss(fake_logits, real_logits) + info
                    self.stats.report("Loss/G", loss)
                    self._check_finite(loss, "G")
                    self.backend.backward("G", loss / num_micro)
        self._step("G", self.cfg.optim.generator)

    def _fakes_for_g(self, num_micro: int) -> tuple:
        """(fakes with G's graph, z, labels): the last D step's (train.reuse_fakes), or new ones."""
        kept, self.kept_fakes = self.kept_fakes, None
        if kept is not None:
            return kept
        z, fake_labels = self._noise(self.batch_per_device // num_micro)
        return self.G(z, fake_labels), z, fake_labels

    def _step(self, name: str, opt_cfg) -> None:
        lr = self.values.lr[name]
        if opt_cfg.warmup_kimg > 0 or opt_cfg.rampdown_kimg > 0:
            lr *= lr_factor(self.num_images, self.total_images, self.cfg.train.batch_size,
                            opt_cfg.warmup_kimg, opt_cfg.rampdown_kimg)
        grad_norm, skipped, fp16_overflow = self.backend.step(name, opt_cfg.grad_clip_norm, lr,
                                                              self.values.beta2[name])
        self.stats.report(f"GradNorm/{name}", torch.as_tensor(grad_norm, dtype=torch.float32, device=self.acc.device))
        self.pending_skips.append((name, self.progress.step + 1, skipped, fp16_overflow))

    def _noise(self, count: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        device = self.acc.device
        z = torch.randn(count, self.cfg.model.latent_dim, device=device, generator=self.noise_gen)
        labels = (torch.randint(self.num_classes, (count,), device=device, generator=self.noise_gen)
                  if self.num_classes else None)
        return z, labels


def _micro_batches(real: tuple, num_micro: int) -> list:
    images, labels = real
    label_chunks = labels.chunk(num_micro) if labels is not None else [None] * num_micro
    return list(zip(images.chunk(num_micro), label_chunks))
