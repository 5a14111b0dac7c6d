"""train.backend=deepspeed: one DeepSpeed engine per network (ZeRO stage 0, 1 or 2), launched
like DDP by torchrun, `accelerate launch` with a plain multi-process config, or slurm/train.sh.

How a GAN step goes through two engines (each rule checked on CPU; docs/deepspeed.md):
- every forward pass calls the raw module (`engine.module`), never the engine. Calling D's
  engine in G's step leaks G's loss into D's ZeRO-1 partitions, or asserts "Gradient computed
  twice" under ZeRO-2 (DeepSpeed #4923); R1's double backward through the engine fails;
- D is frozen during G's step (the trainer freezes it for every backend);
- exactly one `engine.backward` per engine per step (real and fake D losses are summed first);
- our torch Adam is handed to each engine: DeepSpeed's own "Adam" JIT-compiles FusedAdam;
- a non-finite step is skipped by DeepSpeed's overflow check, which runs on the reduced
  gradient partitions with an all-reduce (MAX), so every rank skips the same steps. Stage 0
  has no such check in fp32: there we test the norm of the all-reduced gradients ourselves.
"""

from __future__ import annotations

import json
import os
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

from gan_dist.errors import UserError
from gan_dist.parallel.ddp import set_hyper

CHECKPOINT_TAG = "engine"
DEEPSPEED_DEFAULT_BUCKET = 500_000_000  # elements, DeepSpeed 0.19's reduce_bucket_size
BUCKET_CAP = 50_000_000
# Keys of a user's DeepSpeed JSON that gan_dist's config owns: key -> what to set instead.
OWNED_KEYS = {
    "train_batch_size": "train.batch_size", "train_micro_batch_size_per_gpu": "train.batch_size",
    "gradient_accumulation_steps": "train.num_micro_batches, 1 under DeepSpeed",
    "optimizer": "optim.*; gan_dist passes its own torch Adam", "scheduler": "optim.*.warmup_kimg/rampdown_kimg",
    "fp16": "train.mixed_precision", "bf16": "train.mixed_precision",
    "gradient_clipping": "optim.*.grad_clip_norm",
}
# zero_optimization keys we cannot honour: key -> why.
REFUSED_ZERO_KEYS = {
    "stage": "set deepspeed.zero_stage",
    "offload_optimizer": "ZeRO-Offload needs DeepSpeed's own CPU Adam, and gan_dist passes torch's Adam",
    "offload_param": "parameter offload is ZeRO-3, which gan_dist does not support",
    "compute_grad_norm": "the skip of non-finite steps relies on it",
}


def import_deepspeed(device: str = ""):
    if device == "cpu" or not (device or torch.cuda.is_available()):
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # no guessing, no warning about it
    # DeepSpeed's ZeRO calls a collective that torch deprecates: one warning per rank, not ours to fix.
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor. is deprecated", category=FutureWarning)
    try:
        import deepspeed
    except ImportError as err:
        raise UserError(f"train.backend=deepspeed needs the deepspeed package ({err}); install it with "
                        "`bash launch/setup.sh --deepspeed` (or pip install 'gan_dist[deepspeed]'), "
                        "or set train.backend=ddp") from err
    return deepspeed


def ensure_process_group(device: torch.device) -> None:
    """DeepSpeed wants a process group even in one process; a launcher already made one."""
    import torch.distributed as torch_dist

    os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed asserts it is set; launchers set it
    if not torch_dist.is_initialized():  # one process: an in-memory store, no port to race for
        torch_dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=torch_dist.HashStore(),
                                      rank=0, world_size=1)


def check_user_json(path: str, key: str) -> dict:
    if not path:
        return {}
    try:
        user = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"config key '{key}': cannot read DeepSpeed JSON {path} ({err}); fix the path or the file") from err
    owned = [f"'{k}' (set {OWNED_KEYS[k]})" for k in user if k in OWNED_KEYS]
    owned += [f"'zero_optimization.{k}' ({why})" for k, why in REFUSED_ZERO_KEYS.items()
              if k in user.get("zero_optimization", {})]
    if owned:
        raise UserError(f"config key '{key}': {path} sets {', '.join(owned)}: gan_dist's config owns or "
                        "cannot honour these; remove them from the JSON")
    return user


def bucket_sizes(num_parameters: int) -> dict:
    """ZeRO's reduce and all-gather buckets sized to the network. DeepSpeed's default is 5e8
    elements for any model: one engine of a 3.6M-parameter DCGAN allocated a 2 GB fp32
    reduction buffer (bench/deepspeed_memory.py). A bucket larger than the network buys
    nothing; the size is rounded up to 2^20 elements (DeepSpeed wants an even count), and
    capped at 5e7 (launch/deepspeed/zero2-buckets.json's size), so that a large network's
    reduction still comes in several buckets that overlap with its backward pass."""
    elements = min(BUCKET_CAP, -(-max(1, num_parameters) // 2**20) * 2**20)
    return {"reduce_bucket_size": elements, "allgather_bucket_size": elements}


def engine_config(cfg, name: str, batch_per_device: int, world_size: int, num_parameters: int) -> dict:
    """One engine's DeepSpeed config: ours, with the network's optional JSON merged in."""
    network = "generator" if name == "G" else "discriminator"
    precision = cfg.train.mixed_precision
    config = {
        "train_micro_batch_size_per_gpu": batch_per_device,
        "train_batch_size": batch_per_device * world_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": getattr(cfg.optim, network).grad_clip_norm,
        "zero_optimization": {"stage": cfg.deepspeed.zero_stage, **bucket_sizes(num_parameters)},
        "zero_allow_untested_optimizer": True,  # our torch Adam: no FusedAdam compile
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "steps_per_print": 2**62,  # gan_dist's console prints progress
        "wall_clock_breakdown": False,
    }
    user = check_user_json(getattr(cfg.deepspeed, f"{network}_json"), f"deepspeed.{network}_json")
    for key, value in user.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return config


class CastInputs(nn.Module):
    """The raw module with its floating inputs cast to the engine's dtype (bf16/fp16 engines
    hold half-precision weights, and the raw module skips the engine's own casting)."""

    def __init__(self, module: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.module, self.input_dtype = module, dtype

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None, **kwargs):
        return self.module(x.to(self.input_dtype), labels, **kwargs)


def _initialize(deepspeed, cfg, name: str, module: nn.Module, optimizer, config: dict):
    """deepspeed.initialize; a config DeepSpeed refuses is the user's JSON's fault when there is one."""
    key = f"deepspeed.{'generator' if name == 'G' else 'discriminator'}_json"
    try:
        engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, config=config, dist_init_required=False)
    except Exception as err:  # pydantic and DeepSpeed's own errors alike
        if not getattr(cfg.deepspeed, key.split(".")[1]):
            raise
        first = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
        raise UserError(f"DeepSpeed refused the engine config of {name} that {key} contributes to "
                        f"({type(err).__name__}: {first}); fix or remove that key in the JSON") from err
    return engine


class Float32Forward:
    """A module's own forward run in fp32: its parameters cast up (a differentiable cast, so
    the half-precision parameters DeepSpeed owns still get their gradients), its input cast
    up, its output cast back to the input's dtype. Installed as the module's `forward`
    attribute, so the module tree and state_dict keys stay those of the plain model; the
    class's forward runs directly, so hooks run once."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __call__(self, x: torch.Tensor, *args, **kwargs):
        from torch.nn.utils.stateless import (
            _reparametrize_module,  # what torch.func.functional_call uses
        )

        module = self.module
        parameters = {name: p.float() for name, p in module.named_parameters()}
        with _reparametrize_module(module, parameters):
            out = type(module).forward(module, x.float(), *args, **kwargs)
        return out.to(x.dtype)


def _needs_fp32(module: nn.Module) -> bool:
    """BatchNorm (running statistics) and spectral norm's parametrization (the power
    iteration's u and v, and sigma) accumulate small updates that bf16/fp16 would round away.
    The spectral-norm layer itself keeps computing in half precision: only the normalised
    weight is computed in fp32, then cast back."""
    return isinstance(module, nn.modules.batchnorm._BatchNorm) or type(module).__name__ == "_SpectralNorm"


def keep_statistics_in_fp32(module: nn.Module) -> list[str]:
    """Under half-precision engines: BatchNorm layers and spectral-norm parametrizations run
    in fp32 with fp32 buffers (where DeepSpeed cast them, they are cast back). Returns their
    names."""
    names = []
    for name, sub in module.named_modules():
        if _needs_fp32(sub) and not isinstance(sub.forward, Float32Forward):
            for key, buffer in sub._buffers.items():
                if buffer is not None and buffer.is_floating_point():
                    sub._buffers[key] = buffer.float()
            sub.forward = Float32Forward(sub)
            names.append(name)
    return names


class DeepSpeedBackend:
    name = "deepspeed"

    def __init__(self, cfg, accelerator, G: nn.Module, D: nn.Module, opt_G, opt_D, batch_per_device: int):
        deepspeed = import_deepspeed(accelerator.device.type)
        ensure_process_group(accelerator.device)
        self.acc, self.stage, self.precision = accelerator, cfg.deepspeed.zero_stage, cfg.train.mixed_precision
        self.engines = {}
        for name, module, optimizer in (("G", G, opt_G), ("D", D, opt_D)):
            config = engine_config(cfg, name, batch_per_device, accelerator.num_processes,
                                   sum(p.numel() for p in module.parameters()))
            self.engines[name] = _initialize(deepspeed, cfg, name, module, optimizer, config)
        self.raw = {name: engine.module for name, engine in self.engines.items()}
        dtype = next(self.raw["G"].parameters()).dtype
        if dtype not in (torch.float32, torch.float64):
            for module in self.raw.values():
                keep_statistics_in_fp32(module)
        self.forward = {name: module if dtype in (torch.float32, torch.float64) else CastInputs(module, dtype)
                        for name, module in self.raw.items()}
        self.eager = self.forward
        self.description = f"deepspeed {deepspeed.__version__}: ZeRO-{self.stage}, one engine per network"

    def scaler(self, name: str):
        """None: each engine keeps its own fp16 loss scaler, internal to DeepSpeed."""
        return

    def loss_scale(self, name: str) -> float:
        optimizer = self.engines[name].optimizer
        return float(getattr(optimizer, "loss_scale", getattr(optimizer, "cur_scale", 1.0)))

    def zero_grad(self, name: str) -> None:
        engine = self.engines[name]
        engine.zero_grad()
        if self.stage > 0:
            engine.optimizer.zero_grad(set_to_none=True)

    def micro_batch_sync(self, name: str, index: int, count: int):
        return nullcontext()  # config validation keeps one micro-batch under DeepSpeed

    def backward(self, name: str, loss: torch.Tensor) -> None:
        self.engines[name].backward(loss)

    def step(self, name: str, max_norm: float, lr: float | None, beta2: float | None = None):
        """(gradient norm before clipping, skipped, fp16 overflow), as DDPBackend.step; clipping
        is the engine's (gradient_clipping). DeepSpeed's overflow check reads its verdict on the
        host, so this path syncs once per step."""
        engine = self.engines[name]
        set_hyper(engine.optimizer, lr, beta2)
        own_norm = None
        if self.stage == 0:
            grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
            own_norm = torch.nn.utils.get_total_norm(grads) if grads else None
            if own_norm is not None and self.precision == "no" and not bool(torch.isfinite(own_norm)):
                engine.zero_grad()
                return own_norm, True, False
        engine.step()
        norm = own_norm if own_norm is not None else engine.get_global_grad_norm()
        norm = torch.as_tensor(float("nan") if norm is None else norm, dtype=torch.float32)
        if engine.was_step_applied():
            return norm, False, False
        return norm, self.precision != "fp16", self.precision == "fp16"

    def save(self, directory: Path, is_main: bool) -> list[Path]:
        """deepspeed/G and deepspeed/D: each engine's checkpoint, written by every rank (each
        holds one optimizer partition). Returns the files this rank wrote."""
        written = []
        for name, engine in self.engines.items():
            folder = directory / "deepspeed" / name
            engine.save_checkpoint(str(folder), tag=CHECKPOINT_TAG, save_latest=False)
            # this rank's optimizer partition ("bf16_zero_pp_rank_..." under bf16), and rank 0's model file
            written += (folder / CHECKPOINT_TAG).glob(f"*zero_pp_rank_{self.acc.process_index}_mp_rank_*")
            if is_main:
                written.append(folder / CHECKPOINT_TAG / "mp_rank_00_model_states.pt")
        return [path for path in written if path.is_file()]

    def load(self, checkpoint: Path, load_tensors=None) -> None:
        for name, engine in self.engines.items():
            folder = checkpoint / "deepspeed" / name / CHECKPOINT_TAG
            if not folder.is_dir():
                raise UserError(f"cannot resume from {checkpoint}: it has no DeepSpeed state for {name} "
                                f"({folder} is missing); it was written by train.backend=ddp or is incomplete")
            num_partitions = len(list(folder.glob("*optim_states.pt")))
            if num_partitions and num_partitions != self.acc.num_processes:
                raise UserError(f"cannot resume from {checkpoint}: its ZeRO optimizer state is split over "
                                f"{num_partitions} processes and this run has {self.acc.num_processes}; resume "
                                f"with {num_partitions} processes (DeepSpeed checkpoints are not resharded)")
            path, _ = engine.load_checkpoint(str(folder.parent), tag=CHECKPOINT_TAG, load_optimizer_states=True,
                                             load_lr_scheduler_states=False)
            if path is None:
                raise UserError(f"cannot resume from {checkpoint}: DeepSpeed could not load {folder}")


def memory_per_rank(engine) -> dict[str, int]:
    """Bytes this rank holds for one engine, counted from the tensors themselves.

    parameters: the module's weights (all of them on every rank below ZeRO-3);
    gradients: what holds gradients after a backward pass, before the step (the parameters'
        .grad and ZeRO's reduced partitions);
    optimizer_state: Adam's moments (of this rank's partition under ZeRO);
    master_weights: the fp32 copy of this rank's partition that ZeRO optimizers keep.
    ZeRO's reduction buckets live only during a backward pass: `watch_buckets` measures them.
    """
    def nbytes(tensors) -> int:
        # Counted per tensor (views of one flat buffer each count their own part), each once.
        seen = {(t.data_ptr(), t.numel()): t.numel() * t.element_size() for t in tensors if t is not None}
        return sum(seen.values())

    params = list(engine.module.parameters())
    optimizer = engine.optimizer
    inner = getattr(optimizer, "optimizer", optimizer)
    state = [v for s in inner.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
    param_ptrs = {p.data_ptr() for p in params}
    # Whatever Adam updates that is not the module's own weights is a master copy (ZeRO's fp32
    # partitions, or the fp32 copy of DeepSpeed's bf16 optimizer at stage 0).
    masters = [p for group in inner.param_groups for p in group["params"] if p.data_ptr() not in param_ptrs]
    averaged = getattr(optimizer, "averaged_gradients", {}) or {}
    grads = [p.grad for p in params] + [g for group in averaged.values() if group for g in group]
    return {"parameters": nbytes(params), "gradients": nbytes(grads), "optimizer_state": nbytes(state),
            "master_weights": nbytes(masters)}


def watch_buckets(engine) -> dict:
    """{"bytes": the most ZeRO's reduction buckets (`reduce_bucket_size` elements each, see
    bucket_sizes) held at once}, updated as backward passes allocate them: DeepSpeed allocates
    them at the start of every backward pass and frees them at its end, so a count after the
    pass misses them while the peak (and a GPU's caching allocator) does not."""
    seen = {"bytes": 0}
    optimizer = engine.optimizer
    setup = getattr(optimizer, "setup_buckets", None)
    if setup is None:  # stage 0: no ZeRO optimizer, no buckets
        return seen

    def watched(*args, **kwargs):
        result = setup(*args, **kwargs)
        held = sum(b.numel() * b.element_size() for bucket in optimizer.ipg_buckets.values() for b in bucket.buffer)
        seen["bytes"] = max(seen["bytes"], held)
        return result

    optimizer.setup_buckets = watched
    return seen
