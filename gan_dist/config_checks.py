"""Checks on config values that the schema's types alone do not catch: ranges, combinations
of keys, schedules and the DeepSpeed backend's limits. Each failure is one `UserError` naming
the key and what to set. Registries (model and loss names) are checked after plugins load.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING

from gan_dist.augment_names import parse_pipeline, parse_policy
from gan_dist.errors import UserError

if TYPE_CHECKING:
    from gan_dist.config import Config


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise UserError(f"config key '{key}' {message}")


def validate(cfg: Config) -> None:
    """Checks on values that the types alone do not catch (registries are checked later)."""
    _require(cfg.model.latent_dim > 0, "model.latent_dim", f"must be > 0, got {cfg.model.latent_dim}")
    _require(cfg.model.width_mult > 0, "model.width_mult", "must be > 0")
    _require(0 <= cfg.model.d_dropout < 1, "model.d_dropout", "must be in [0, 1)")
    _require(cfg.model.d_minibatch_std >= 0, "model.d_minibatch_std", "must be >= 0 (0 = off)")
    categories, latent = cfg.model.num_latent_categories, cfg.model.latent_dim
    _require(categories == 0 or 2 <= categories <= latent, "model.num_latent_categories",
             f"must be 0 (off) or 2 to model.latent_dim ({latent}): the code is read off z's first coordinates; "
             f"got {categories}")
    _require(cfg.train.batch_size > 0, "train.batch_size", "must be > 0")
    _require(cfg.train.num_micro_batches > 0, "train.num_micro_batches", "must be >= 1")
    _require(not (cfg.train.reuse_fakes and cfg.train.num_micro_batches > 1), "train.reuse_fakes",
             "must be false with train.num_micro_batches > 1: it would hold every micro-batch's G graph through the "
             "D phase, the memory micro-batches exist to save (and DDP prepares its reduction at a forward)")
    _require(cfg.train.n_critic > 0, "train.n_critic", "must be >= 1")
    _require(cfg.train.total_kimg > 0, "train.total_kimg", "must be > 0")
    _require(cfg.train.num_threads >= 0, "train.num_threads", "must be >= 0 (0 = the allocated cores per process)")
    _require(cfg.train.max_steps >= 0, "train.max_steps", "must be >= 0 (0 = no limit)")
    _require(cfg.train.ema_half_life_kimg >= 0, "train.ema_half_life_kimg", "must be >= 0 (0: G_ema is G)")
    _require(cfg.data.augment_p is None or 0 <= cfg.data.augment_p <= 1, "data.augment_p", "must be in [0, 1]")
    _check_ada(cfg)
    _check_schedules(cfg)
    _require(cfg.loss.r1_interval > 0, "loss.r1_interval", "must be >= 1")
    _require(cfg.loss.r1_gamma >= 0, "loss.r1_gamma", "must be >= 0 (0 = off)")
    _require(cfg.loss.gp_weight >= 0, "loss.gp_weight", "must be >= 0 (0 = off)")
    _require(cfg.loss.info_weight >= 0, "loss.info_weight", "must be >= 0")
    _require(cfg.train.ema_rampup >= 0, "train.ema_rampup", "must be >= 0 (0 = off)")
    _require(cfg.train.max_skipped_in_row >= 1, "train.max_skipped_in_row", "must be >= 1")
    _require(cfg.dist.timeout_s > 0, "dist.timeout_s", "must be > 0 seconds")
    _check_deepspeed(cfg)
    _require(cfg.checkpoint.every_kimg >= 0, "checkpoint.every_kimg", "must be >= 0 (0 = only at the end)")
    _require(cfg.checkpoint.every_minutes >= 0, "checkpoint.every_minutes", "must be >= 0 (0 = off)")
    _require(cfg.checkpoint.keep_last >= 0, "checkpoint.keep_last", "must be >= 0 (0 = keep all)")
    _require(cfg.log.every_steps > 0, "log.every_steps", "must be >= 1")
    _require(cfg.log.sample_every_kimg > 0, "log.sample_every_kimg", "must be > 0")
    _require(cfg.log.num_samples > 0, "log.num_samples", "must be >= 1")
    _require(cfg.data.num_workers >= 0, "data.num_workers", "must be >= 0")
    _require(cfg.data.shuffle_buffer >= 1, "data.shuffle_buffer", "must be >= 1")
    _require(cfg.data.resolution >= 0, "data.resolution", "must be >= 0 (0 = native size)")
    _require(cfg.data.num_classes >= 0, "data.num_classes", "must be >= 0")
    _require(cfg.data.max_shard_retries >= 0, "data.max_shard_retries", "must be >= 0")
    _require(cfg.data.retry_backoff_s >= 0, "data.retry_backoff_s", "must be >= 0 seconds")
    _require(cfg.eval.every_kimg >= 0, "eval.every_kimg", "must be >= 0 (0 = off)")
    _require(cfg.eval.num >= 2, "eval.num", "must be >= 2")
    _require(not cfg.eval.every_kimg or bool(cfg.eval.metrics), "eval.metrics",
             "must name a metric when eval.every_kimg > 0, e.g. eval.metrics=[fid]")
    if cfg.eval.metrics:
        from gan_dist.eval import check_metrics

        check_metrics(list(cfg.eval.metrics))
    parse_policy(cfg.data.diffaugment)
    _require(bool(cfg.run.name) and "/" not in cfg.run.name, "run.name", "must be a plain name")
    for net in ("generator", "discriminator"):
        opt = getattr(cfg.optim, net)
        _require(opt.lr > 0, f"optim.{net}.lr", "must be > 0")
        _require(0 <= opt.beta1 < 1 and 0 <= opt.beta2 < 1, f"optim.{net}.beta1/beta2", "must be in [0, 1)")
        _require(opt.eps > 0, f"optim.{net}.eps", "must be > 0")
        _require(opt.weight_decay >= 0, f"optim.{net}.weight_decay", "must be >= 0")
        _require(opt.grad_clip_norm >= 0, f"optim.{net}.grad_clip_norm", "must be >= 0 (0 = off)")
        _require(opt.warmup_kimg >= 0, f"optim.{net}.warmup_kimg", "must be >= 0 (0 = off)")
        _require(opt.rampdown_kimg >= 0, f"optim.{net}.rampdown_kimg", "must be >= 0 (0 = off)")


def notes(cfg: Config, given_keys: Collection[str] = ()) -> list[str]:
    """Valid settings that have no effect, for `gan-dist check` to mention: not errors, since one
    config may serve a built-in dataset and, with data.path=..., your own shards."""
    found = []
    default_dataset = type(cfg.data)().dataset
    if cfg.data.path and cfg.data.dataset and (cfg.data.dataset != default_dataset or "data.dataset" in given_keys):
        found.append(f"data.dataset={cfg.data.dataset!r} is ignored: data.path is set, and the samples come from "
                     f"{cfg.data.path} (data.dataset names a built-in source only while data.path is ''); "
                     "set data.dataset='' to say so")
    return found


def _check_schedules(cfg: Config) -> None:
    from gan_dist import schedules

    bounds = {"lr_schedule": (1e-12, 1.0), "beta2_schedule": (0.0, 0.9999), "gamma_schedule": (0.0, float("inf")),
              "ema_half_life_schedule": (0.0, float("inf")), "augment_p_schedule": (0.0, 1.0)}
    for key, schedule in schedules.scheduled(cfg).items():
        schedules.check(schedule, key, *bounds[key.rpartition(".")[2]], _require)
    for net in ("generator", "discriminator"):
        opt = getattr(cfg.optim, net)
        _require(opt.rampdown_kimg == 0 or opt.lr_schedule.end is None, f"optim.{net}.rampdown_kimg",
                 f"must be 0 with optim.{net}.lr_schedule (both shape the end of the learning rate): keep one")


def _check_ada(cfg: Config) -> None:
    parse_pipeline(cfg.data.augment)
    _require(not (cfg.data.augment and cfg.data.diffaugment), "data.diffaugment",
             "must be '' with data.augment (one augmentation before D): keep one")
    _require(cfg.data.ada_kimg >= 0, "data.ada_kimg", "must be >= 0 (0 = p fixed or scheduled)")
    if cfg.data.ada_kimg > 0:
        _require(bool(cfg.data.augment), "data.ada_kimg", "needs data.augment, e.g. data.augment=bgc")
        _require(cfg.data.augment_p_schedule.end is None, "data.ada_kimg",
                 "must be 0 with data.augment_p_schedule (p is either adapted or scheduled): keep one")
    target = cfg.data.ada_target
    _require(target is None or -1 < target < 1, "data.ada_target", f"must be in (-1, 1), got {target}")
    _require(target is None or cfg.data.ada_kimg > 0, "data.ada_target",
             "applies only when p is adapted: set data.ada_kimg > 0 too, or drop data.ada_target")


def _check_deepspeed(cfg: Config) -> None:
    _require(cfg.deepspeed.zero_stage in (0, 1, 2), "deepspeed.zero_stage",
             f"must be 0, 1 or 2, got {cfg.deepspeed.zero_stage} (stage 3 is not supported: docs/deepspeed.md)")
    if cfg.train.backend != "deepspeed":
        return
    # One engine.backward per engine per step: DeepSpeed owns accumulation and counts it itself.
    _require(cfg.train.num_micro_batches == 1, "train.num_micro_batches",
             "must be 1 under train.backend=deepspeed (raise the number of processes, or use train.backend=ddp)")
    _require(not cfg.model.sync_bn, "model.sync_bn", "must be false under train.backend=deepspeed")
    _require(not cfg.train.compile, "train.compile", "must be false under train.backend=deepspeed (not supported yet)")
    _require(not cfg.train.reuse_fakes, "train.reuse_fakes", "must be false under train.backend=deepspeed (untested; or use train.backend=ddp)")
    from gan_dist.parallel.zero import check_user_json

    for network in ("generator", "discriminator"):  # read now: a bad file must not touch the run directory
        check_user_json(getattr(cfg.deepspeed, f"{network}_json"), f"deepspeed.{network}_json")
