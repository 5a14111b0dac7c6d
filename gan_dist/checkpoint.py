"""Reading the networks of a checkpoint (runs/<name>/checkpoints/step_XXXXXXXX/, `latest`)
or of an export: G, D, G_ema as safetensors (no pickles that can run code) and model.json,
enough to rebuild G without the training config. Writing is resume.py's.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file
from torch import nn

from gan_dist.errors import UserError

SNAPSHOT_FORMAT = "gan_dist.snapshot/1"


def latest_snapshot(run_dir: Path) -> Path:
    pointer = Path(run_dir) / "checkpoints" / "latest"
    if not pointer.is_file():
        raise UserError(f"{run_dir} has no checkpoints/latest; is it a gan_dist run directory with a checkpoint?")
    return pointer.parent / pointer.read_text().strip()


def snapshot_dir(run_dir: Path, step: int | None = None) -> Path:
    """A run's checkpoint at `step`, or its latest."""
    if step is None:
        return latest_snapshot(run_dir)
    path = Path(run_dir) / "checkpoints" / f"step_{step:08d}"
    if not path.is_dir():
        kept = sorted(p.name for p in (Path(run_dir) / "checkpoints").glob("step_*") if p.is_dir())
        raise UserError(f"{run_dir} has no checkpoint of step {step}; it keeps {', '.join(kept) or 'none'}")
    return path


def load_generator(source: Path, which: str = "G_ema") -> tuple[nn.Module, dict]:
    """Rebuild G (or G_ema) from a checkpoint or export directory, or a run's latest checkpoint.

    Returns (module in eval mode, model.json). Weights come from safetensors only.
    """
    import dataclasses
    import importlib

    from gan_dist.config import ModelConfig
    from gan_dist.models import build_models

    snapshot = Path(source)
    if not (snapshot / "model.json").is_file():
        if not (snapshot / "checkpoints" / "latest").is_file():
            raise UserError(f"{source} is neither an exported model (no model.json) nor a run directory "
                            "with checkpoints/latest")
        snapshot = latest_snapshot(snapshot)
        if not (snapshot / "model.json").is_file():
            raise UserError(f"{source}: checkpoints/latest names {snapshot.name}, which is missing or incomplete")
    info = json.loads((snapshot / "model.json").read_text())
    if info.get("format") != SNAPSHOT_FORMAT:
        raise UserError(f"{snapshot} has model format {info.get('format')!r}; this gan_dist reads {SNAPSHOT_FORMAT}")
    for plugin in info.get("plugins", []):
        try:
            importlib.import_module(plugin)
        except ImportError as err:
            raise UserError(f"{snapshot} needs the plugin module '{plugin}' ({err}); put it on PYTHONPATH") from err
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    newer = sorted(set(info["model"]) - known)
    if newer:  # dropping them could build another architecture (e.g. G without its code input)
        raise UserError(f"{snapshot} was written by a newer gan_dist (model keys {', '.join(newer)} are unknown "
                        "here); upgrade gan_dist to read it")
    model_cfg = ModelConfig(**info["model"])
    G, _ = build_models(model_cfg, tuple(info["shape"]), info["num_classes"])
    G.load_state_dict(load_file(str(snapshot / f"{which}.safetensors")))
    return G.eval().requires_grad_(False), info
