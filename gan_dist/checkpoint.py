"""Snapshots of the networks under runs/<name>/checkpoints/step_XXXXXXXX/, plus `latest`.

Weights are safetensors (no pickles that can run code). Each snapshot also holds
model.json, enough to rebuild G without the training config. A snapshot is written into a
temporary directory and renamed into place, and `latest` is updated last, so a crash at
any point leaves the previous snapshot loadable.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

from gan_dist.errors import UserError

SNAPSHOT_FORMAT = "gan_dist.snapshot/1"


def _state(module: nn.Module) -> dict:
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def save_snapshot(run_dir: Path, step: int, modules: dict[str, nn.Module], model_info: dict,
                  accelerator) -> Path:
    """Every rank calls this; rank 0 writes (the weights are identical on every rank)."""
    final = run_dir / "checkpoints" / f"step_{step:08d}"
    if accelerator.is_main_process:
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for name, module in modules.items():
            save_file(_state(module), str(tmp / f"{name}.safetensors"))
        (tmp / "model.json").write_text(json.dumps({"format": SNAPSHOT_FORMAT, "step": step, **model_info}, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        latest_tmp = run_dir / "checkpoints" / "latest.tmp"
        latest_tmp.write_text(final.name + "\n")
        os.replace(latest_tmp, run_dir / "checkpoints" / "latest")
    accelerator.wait_for_everyone()
    return final


def latest_snapshot(run_dir: Path) -> Path:
    pointer = Path(run_dir) / "checkpoints" / "latest"
    if not pointer.is_file():
        raise UserError(f"{run_dir} has no checkpoints/latest; is it a finished gan_dist run directory?")
    return pointer.parent / pointer.read_text().strip()


def load_generator(run_dir: Path, which: str = "G_ema") -> tuple[nn.Module, dict]:
    """Rebuild G (or G_ema) from the latest snapshot of a run; returns (module in eval mode, model.json)."""
    import dataclasses
    import importlib

    from gan_dist.config import ModelConfig
    from gan_dist.models import build_models

    snapshot = latest_snapshot(run_dir)
    info = json.loads((snapshot / "model.json").read_text())
    if info.get("format") != SNAPSHOT_FORMAT:
        raise UserError(f"{snapshot} has snapshot format {info.get('format')!r}; this gan_dist reads {SNAPSHOT_FORMAT}")
    for plugin in info.get("plugins", []):
        importlib.import_module(plugin)
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    model_cfg = ModelConfig(**{k: v for k, v in info["model"].items() if k in known})
    G, _ = build_models(model_cfg, tuple(info["shape"]), info["num_classes"])
    G.load_state_dict(load_file(str(snapshot / f"{which}.safetensors")))
    return G.eval().requires_grad_(False), info
