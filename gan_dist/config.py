"""The run configuration: a typed schema, YAML files, dotted command-line overrides.

OmegaConf merges the schema defaults, the YAML file and the overrides, and checks keys and
types against the dataclasses. Every field carries a one-line docstring, which `--help`
prints. Choices that plugins can extend (model and loss names) are checked against their
registries after the plugins are imported.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import itertools
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from gan_dist.config_checks import validate
from gan_dist.errors import UserError, did_you_mean
from gan_dist.schedules import Schedule

# The quickstart's config, shipped inside the package (configs/default.yaml links to it):
# what `python train.py` and `accelerate launch train.py` train when given no --config.
DEFAULT_CONFIG = Path(__file__).resolve().parent / "default.yaml"


@dataclass
class RunConfig:
    name: str = "default"
    """Run name; outputs go to <run.root>/<run.name>/."""
    root: str = "runs"
    """Directory that holds the run directories."""
    overwrite: bool = False
    """Replace an existing run of the same name instead of refusing to start."""


@dataclass
class DataConfig:
    dataset: str = "digits"
    """Built-in source prepared on first use (digits, ring8, grid25, mnist, fashionmnist); '' for your own shards."""
    path: str = ""
    """Dataset directory with index.json, or a shard pattern such as shards/train-{000000..000009}.tar; '' means data/<data.dataset>[-<resolution>px]."""
    root: str = ""
    """Directory with torchvision's raw files (<root>/MNIST/raw/...), used to prepare mnist and fashionmnist."""
    resolution: int = 0
    """Resize images to this many pixels square when preparing a built-in dataset (0 keeps the native size)."""
    num_workers: int = 2
    """DataLoader worker processes per training process for streamed data (0 reads in the training process); resident data uses none."""
    shuffle_buffer: int = 1000
    """Samples held in each streaming worker's shuffle buffer (at least 8 chunks of a chunked dataset), seeded from train.seed, rank and worker; 1 turns it off."""
    resident: Literal["auto", "off", "host", "device"] = "auto"
    """Hold the whole dataset in one array in each process, in host or device memory, and gather batches from it (no workers); off streams it from the shards; auto holds it in host memory when it is at most 4 GiB and a copy per process fits in a quarter of the node's available memory."""
    num_classes: int = 0
    """Classes of a conditional run on a shard pattern without index.json (with an index, it is read from there)."""
    max_shard_retries: int = 8
    """Times a piece of a shard whose read failed (storage or network) is tried again, later in the epoch and after a doubling backoff, before the run stops naming it."""
    retry_backoff_s: float = 2.0
    """Wait before the first retry of a failed shard read; it doubles with each failure, up to 120 s."""
    on_error: Literal["skip", "raise"] = "skip"
    """A sample that cannot be read (corrupt, wrong shape, no label in a conditional run): skip and count it, or stop."""
    hflip: bool = False
    """Mirror real images left-right with probability 1/2 (only for data that is symmetric)."""
    diffaugment: str = ""
    """Differentiable augmentation before D for reals and fakes: a comma list of color, translation, cutout."""
    augment: str = ""
    """StyleGAN2-ADA's augmentations before D for reals and fakes: bgc (its 12), bgc,cutout, or a comma list of xflip, rotate90, xint, scale, rotate, aniso, xfrac, brightness, contrast, lumaflip, hue, saturation, cutout."""
    augment_p: Optional[float] = None  # noqa: UP045 - OmegaConf reads typing.Optional
    """Probability that each image D sees is put through data.diffaugment, or of each operation of data.augment; the start when scheduled or adapted. Unset: 0 when adapted (data.ada_kimg > 0), else 1."""
    augment_p_schedule: Schedule = field(default_factory=Schedule)
    """Cosine schedule of data.augment_p: end value and horizon in kimg."""
    ada_kimg: float = 0.0
    """Adapt data.augment_p to D's overfitting every 4 D steps, moving it by at most 1 per ada_kimg kimg (StyleGAN2-ADA: 500 for runs of tens of Mimg; size it to the run); 0 keeps p fixed or scheduled."""
    ada_target: Optional[float] = None  # noqa: UP045 - OmegaConf reads typing.Optional
    """Target of ADA's signal: E[sign(D(real))] (default 0.6), or E[sign(D(real) - D(fake))] for the relativistic and wasserstein losses (default 0.75)."""


@dataclass
class ModelConfig:
    name: str = "mlp"
    """Architecture from the model registry: mlp, dcgan, resnet, mlp2d, or one registered by a plugin."""
    latent_dim: int = 100
    """Length of the noise vector z fed to G."""
    width_mult: float = 1.0
    """Multiplier on every hidden width (mlp: 256/512/1024 units; dcgan: 64 base channels; resnet: see its docstring)."""
    g_norm: Literal["batch", "none"] = "batch"
    """Normalisation in G's hidden layers."""
    d_norm: Literal["none", "batch", "spectral"] = "none"
    """Normalisation in D's hidden layers."""
    d_dropout: float = 0.0
    """Dropout after each hidden layer of the MLP discriminators (mlp, mlp2d), as in the original GAN."""
    d_minibatch_std: int = 0
    """Group size of a minibatch-std feature before the MLP discriminators' last layer (0 = off)."""
    num_latent_categories: int = 0
    """K: G gets a K-way categorical code (argmax of z's first K coords, one-hot), D learns to predict it; 0 = off."""
    conditional: bool = False
    """Class-conditional G (label embedding) and projection D; needs a labelled dataset."""
    sync_bn: bool = False
    """Convert BatchNorm layers to SyncBatchNorm (statistics over the global batch); GPU only."""


@dataclass
class LossConfig:
    name: str = "nonsaturating"
    """Adversarial loss on logits: nonsaturating, minimax, hinge, wasserstein, least_squares, relativistic (its G phase reads real images too)."""
    r1_gamma: float = 0.0
    """Weight gamma of the R1 penalty gamma/2 * |grad D(real)|^2 (and of R2 with loss.r2); 0 turns it off."""
    r2: bool = False
    """Also penalise D's input gradient at the fakes D saw (R2), with the same gamma: gamma/2 * (R1 + R2), as R3GAN."""
    gamma_schedule: Schedule = field(default_factory=Schedule)
    """Cosine schedule of loss.r1_gamma: end value and horizon in kimg."""
    r1_interval: int = 16
    """Apply R1 (and R2) every this many D steps (lazy regularisation), scaled by the interval."""
    info_weight: float = 0.1
    """Weight of InfoGAN's code loss when model.num_latent_categories > 0 (0.1 measured best on the digits)."""
    gp_weight: float = 0.0
    """Weight of the WGAN-GP gradient penalty on real/fake interpolates; 0 turns it off."""


@dataclass
class OptimizerConfig:
    lr: float = 2e-4
    """Adam learning rate."""
    lr_schedule: Schedule = field(default_factory=Schedule)
    """Cosine schedule of the learning rate: end value and horizon in kimg."""
    beta1: float = 0.5
    """Adam beta1 (the tutorial's 0.5)."""
    beta2: float = 0.999
    """Adam beta2."""
    beta2_schedule: Schedule = field(default_factory=Schedule)
    """Cosine schedule of beta2: end value and horizon in kimg."""
    eps: float = 1e-8
    """Adam epsilon."""
    weight_decay: float = 0.0
    """Adam (L2) weight decay."""
    grad_clip_norm: float = 0.0
    """Clip the global gradient norm to this value before each step; 0 turns it off."""
    warmup_kimg: float = 0.0
    """Ramp the learning rate linearly from 0 over this many thousand images; 0 turns it off."""
    rampdown_kimg: float = 0.0
    """Ramp the learning rate linearly down to 0 over the last this many thousand images of train.total_kimg; 0 turns it off."""


@dataclass
class OptimConfig:
    generator: OptimizerConfig = field(default_factory=OptimizerConfig)
    """Optimizer of G."""
    discriminator: OptimizerConfig = field(default_factory=OptimizerConfig)
    """Optimizer of D."""
    fused: bool = True
    """Fused Adam kernels (CPU and GPU): skips a non-finite step on the device, with no host sync; false: foreach."""


@dataclass
class TrainConfig:
    total_kimg: float = 1000.0
    """Length of training in thousands of real images shown to D."""
    max_steps: int = 0
    """Stop after this many G steps even if total_kimg is not reached; 0 means no limit."""
    batch_size: int = 64
    """Global batch of real images per D step, summed over all processes."""
    num_micro_batches: int = 1
    """Gradient accumulation: each phase runs this many micro-batches, synchronising only the last."""
    n_critic: int = 1
    """D steps per G step."""
    reuse_fakes: bool = False
    """The G step reuses the last D step's fakes (pytorch/examples' dcgan does): one G forward less per step, G's graph held through that D step."""
    seed: int = 0
    """Base seed; noise and data streams derive theirs from it and the global rank."""
    num_threads: int = 0
    """CPU threads per process for torch (0: the allocated cores shared among the node's processes, or OMP_NUM_THREADS when set); results depend on it, so pin it to reproduce."""
    device: Literal["auto", "cuda", "cpu"] = "auto"
    """auto: CUDA when torch can use it (exit 2 if GPUs are allocated but CUDA is broken); cuda: require it; cpu: CPU even on a GPU node."""
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    """Autocast precision of G and D forwards (fp16 with one grad scaler per network); master weights stay fp32."""
    channels_last: bool = False
    """Convolution weights and images in channels-last memory format (faster convolutions on recent GPUs)."""
    compile: bool = False
    """torch.compile G's and D's forward passes (R1 and the gradient penalty run uncompiled: no double backward)."""
    tf32: bool = True
    """Allow TF32 matmuls and convolutions on Ampere and newer GPUs (float32 runs only; no effect on CPUs)."""
    backend: Literal["ddp", "deepspeed"] = "ddp"
    """ddp: accelerate's DDP; deepspeed: one DeepSpeed ZeRO engine per network (deepspeed.*, docs/deepspeed.md)."""
    ema_half_life_kimg: float = 10.0
    """Half-life of G_ema in thousands of images (0: G_ema is G)."""
    ema_half_life_schedule: Schedule = field(default_factory=Schedule)
    """Cosine schedule of the half-life (end in kimg, horizon in kimg); it may start at 0."""
    ema_rampup: float = 0.05
    """Cap the EMA half-life at this fraction of the images seen so far (early speed-up); 0 turns it off."""
    resume: str = "auto"
    """auto: continue from this run's latest checkpoint if there is one; none: start afresh; or a checkpoint/run path."""
    max_skipped_in_row: int = 20
    """Abort when this many optimizer steps in a row had non-finite gradients (fp16 scaler skips do not count)."""
    rollback_on_divergence: bool = False
    """Instead of aborting after max_skipped_in_row, reload the latest checkpoint and go on with new noise (3 tries)."""


@dataclass
class DeepSpeedConfig:
    """train.backend=deepspeed only (pip install gan_dist[deepspeed]; docs/deepspeed.md)."""

    zero_stage: int = 1
    """ZeRO stage of both engines: 0 (plain data parallel), 1 (optimizer state sharded), 2 (+ gradients)."""
    generator_json: str = ""
    """Optional DeepSpeed JSON merged into G's engine config, e.g. launch/deepspeed/zero2-buckets.json."""
    discriminator_json: str = ""
    """The same for D's engine."""


@dataclass
class CheckpointConfig:
    """Full training state, for exact resume."""

    every_kimg: float = 200.0
    """Save a checkpoint every this many thousand images (0: only at the end)."""
    every_minutes: float = 30.0
    """Also save when this many minutes passed since the last one (checked at log intervals; 0: off)."""
    keep_last: int = 3
    """Checkpoints kept in runs/<name>/checkpoints (older ones are deleted; 0 keeps all)."""


@dataclass
class DistConfig:
    """How multi-process runs fail: never silently, never forever."""

    timeout_s: float = 1800.0
    """A training step taking longer dumps every rank's Python stacks and exits; collectives time out a little later."""


@dataclass
class LogConfig:
    every_steps: int = 100
    """Reduce statistics across ranks, print a line and append to metrics.jsonl every this many G steps."""
    sample_every_kimg: float = 50.0
    """Write a sample grid of G_ema every this many thousand images (and at the end)."""
    num_samples: int = 64
    """Images in each sample grid (fixed noise, the same all run)."""
    tensorboard: bool = False
    """Also write scalars and sample grids to TensorBoard under the run directory."""


@dataclass
class EvalConfig:
    """Quality metrics during training; `gan-dist eval` computes them for any checkpoint."""

    every_kimg: float = 0.0
    """Evaluate eval.metrics on G_ema every this many thousand images and at the end (0: off)."""
    metrics: list[str] = field(default_factory=list)
    """Any of fid, kid, is, modes2d, cls; the first one picks checkpoints/best."""
    num: int = 10_000
    """Generated samples per evaluation (FID is biased upward for small counts: compare equal counts)."""
    inception_weights: str = ""
    """Local path of weights-inception-2015-12-05-6726825d.pth (FID/KID/IS on offline machines)."""
    allow_download: bool = False
    """Let torch-fidelity download the Inception weights when no local file is found."""
    cache_dir: str = ""
    """Where reference features and digit classifiers are cached ('' = ~/.cache/gan_dist/eval)."""
    reference_num: int = 0
    """Real samples FID and KID compare with: 0 = the whole training set (fid50k_full, as StyleGAN and R3GAN report); fewer = the first N of a dataset shuffled at prepare time, else a seeded random N."""
    batch: int = 250
    """Samples per generator and feature-extractor call."""
    seed: int = 0
    """Seed of the evaluation latents (the same samples at every evaluation)."""


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    """Where outputs go."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training data."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """G and D architecture."""
    loss: LossConfig = field(default_factory=LossConfig)
    """Adversarial loss and regularisers."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """One Adam per network (two time-scale update rule)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Length, batch, precision and seeds."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """When to save full checkpoints and how many to keep."""
    dist: DistConfig = field(default_factory=DistConfig)
    """Multi-process behaviour: timeouts."""
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    """ZeRO settings under train.backend=deepspeed."""
    log: LogConfig = field(default_factory=LogConfig)
    """Console, metrics and samples."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Periodic quality metrics."""
    plugins: list[str] = field(default_factory=list)
    """Python modules imported at start, e.g. to register models: plugins=[my_models]."""


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass (read from its source; {} without source)."""
    try:
        tree = ast.parse(inspect.getsource(cls))
    except (OSError, TypeError):  # installed without .py files: --help loses the docs, nothing else
        return {}
    body = tree.body[0].body
    docs = {}
    for node, after in itertools.pairwise(body):
        if (isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[node.target.id] = after.value.value.strip()
    return docs


def _literal_choices(cls: type, name: str) -> tuple | None:
    hint = typing.get_type_hints(cls)[name]
    return typing.get_args(hint) if typing.get_origin(hint) is Literal else None


def _fix_yaml_values(schema_cls: type, values: Any) -> Any:
    """Undo two YAML readings: `no` and `off` are False (Literal fields that accept 'no' or 'off'
    want the string), and `key=` is None (string fields want '')."""
    if not isinstance(values, dict):
        return values
    hints = typing.get_type_hints(schema_cls)
    for key, value in values.items():
        hint = hints.get(key)
        if dataclasses.is_dataclass(hint):
            values[key] = _fix_yaml_values(hint, value)
        elif value is False and {"no", "off"} & set(_literal_choices(schema_cls, key) or ()):
            values[key] = "no" if "no" in _literal_choices(schema_cls, key) else "off"
        elif value is None and hint is str:
            values[key] = ""
    return values


# Keys an older gan_dist took, and what replaced them.
REMOVED = {"data.cache_mb": "datasets that fit in memory are held whole instead (data.resident, by default auto); "
                            "delete the key"}


def _keys_at(schema: DictConfig, dotted_parent: str) -> list[str]:
    node = OmegaConf.select(schema, dotted_parent) if dotted_parent else schema
    return list(node.keys()) if isinstance(node, DictConfig) else []


def _explain(err: OmegaConfBaseException, schema: DictConfig, origin: str) -> UserError:
    """One line that names the key, the problem, and the closest valid key."""
    key = getattr(err, "full_key", None) or "?"
    if isinstance(err, ConfigKeyError) and key in REMOVED:
        return UserError(f"{origin}: config key '{key}' was removed: {REMOVED[key]}")
    if isinstance(err, ConfigKeyError):
        parent = key.rpartition(".")[0]
        valid = [f"{parent}.{k}" if parent else k for k in _keys_at(schema, parent)]
        return UserError(f"{origin}: unknown config key '{key}'{did_you_mean(key, valid)}")
    first_line = str(err).splitlines()[0]
    return UserError(f"{origin}: config key '{key}': {first_line}")


def _merge(schema: DictConfig, values: Any, origin: str) -> DictConfig:
    try:
        return OmegaConf.merge(schema, values)
    except OmegaConfBaseException as err:
        raise _explain(err, schema, origin) from err


def _parse_overrides(overrides: list[str]) -> dict:
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise UserError(f"override '{item}' is not of the form key=value, e.g. train.total_kimg=2")
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist(overrides))
    except OmegaConfBaseException as err:
        raise UserError(f"command-line overrides: {str(err).splitlines()[0]}") from err


def _read_yaml(path: str) -> dict:
    file = Path(path)
    if not file.is_file():
        raise UserError(f"config file '{path}' does not exist; name a YAML file that does (the ones shipped are in configs/)")
    try:
        return OmegaConf.to_container(OmegaConf.load(file)) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise UserError(f"config file '{path}' is not valid YAML: {str(err).splitlines()[0]}") from err


def load_config(path: str | None, overrides: list[str]) -> Config:
    """Schema defaults <- YAML file <- dotted overrides, validated, as a `Config` object."""
    schema = OmegaConf.structured(Config)
    merged = schema
    if path:
        merged = _merge(merged, _fix_yaml_values(Config, _read_yaml(path)), f"config file {path}")
    values = _fix_yaml_values(Config, _parse_overrides(overrides))
    merged = _merge(merged, values, "command line")
    cfg = OmegaConf.to_object(merged)
    validate(cfg)
    return cfg


def given_keys(path: str | None, overrides: list[str]) -> set[str]:
    """The dotted keys that the YAML file or the overrides set, whatever their values (one set
    to its default counts too): for notes on keys that another key makes moot."""
    given: set[str] = set()

    def walk(node: dict, prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict) and value:
                walk(value, f"{prefix}{key}.")
            else:
                given.add(f"{prefix}{key}")

    walk(_read_yaml(path) if path else {}, "")
    walk(_parse_overrides(overrides), "")
    return given


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Config) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg))


def help_lines(cls: type = Config, prefix: str = "") -> list[str]:
    """'key (type, default): doc' for every leaf of the schema, for --help."""
    docs = field_docs(cls)
    lines = []
    defaults = cls()
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hint):
            lines += help_lines(hint, key + ".")
            continue
        choices = _literal_choices(cls, f.name)
        kind = "|".join(choices) if choices else getattr(hint, "__name__", str(hint))
        lines.append(f"  {key} ({kind}, default {getattr(defaults, f.name)!r})\n      {docs.get(f.name, '')}")
    return lines


def flat_dict(cfg: Config) -> dict[str, Any]:
    """{'train.batch_size': 64, ...} with lists as strings (for TensorBoard's hparams)."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            out[prefix[:-1]] = node if isinstance(node, (int, float, str, bool)) else str(node)

    walk(to_dict(cfg), "")
    return out
