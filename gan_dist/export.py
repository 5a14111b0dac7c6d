"""`gan-dist export` and `gan-dist sample`: G_ema outside training.

An export is a directory with `G_ema.safetensors` and `model.json` (model settings, sample
shape, classes, plugins): enough to rebuild G without the training config, and read by
`sample` exactly as a run's checkpoint is, so both give the same images for the same seed.

    gan-dist export --run runs/default [--step N] --out exported/default
    gan-dist sample --model exported/default --num 64 --out grid.png [--seed 0] [--truncation 1.5] [--class 3]
    gan-dist sample --run runs/default --num 64 --out samples/        (one PNG per sample)
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from PIL import Image

from gan_dist.checkpoint import load_generator, snapshot_dir
from gan_dist.errors import UserError
from gan_dist.visual import save_samples, to_uint8

EXPORT_FILES = {"G_ema.safetensors", "model.json"}


def export(run: str, step: int | None, out: str, force: bool) -> Path:
    source, target = snapshot_dir(Path(run), step), Path(out)
    if target.exists() and not force:
        raise UserError(f"{out} already exists; pass --force to replace it")
    if target.exists() and (not target.is_dir() or {p.name for p in target.iterdir()} - EXPORT_FILES):
        raise UserError(f"--force replaces only an earlier export, and {out} holds other things; choose another --out")
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # copyfile, not copy2: new files take the usual mode (0666 less the umask), not that of a
    # checkpoint written 0600 by an older gan_dist.
    for name in sorted(EXPORT_FILES):
        shutil.copyfile(source / name, tmp / name)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def latents(num: int, latent_dim: int, seed: int, truncation: float) -> torch.Tensor:
    """N(0, 1) latents; with truncation t > 0, values beyond +-t are redrawn (fidelity for variety)."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(num, latent_dim, generator=gen)
    if truncation > 0:
        while (outside := z.abs() > truncation).any():
            z[outside] = torch.randn(int(outside.sum()), generator=gen)
    return z


@torch.no_grad()
def sample(model: str, run: str, step: int | None, num: int, out: str, seed: int, truncation: float,
           class_index: int | None) -> Path:
    G, info = load_generator(Path(model) if model else snapshot_dir(Path(run), step))
    labels = None
    if info["num_classes"] and info["model"]["conditional"]:
        if class_index is not None and not 0 <= class_index < info["num_classes"]:
            raise UserError(f"--class must be in 0..{info['num_classes'] - 1}, got {class_index}")
        labels = (torch.full((num,), class_index) if class_index is not None
                  else torch.arange(num) % info["num_classes"])
    elif class_index is not None:
        raise UserError("--class applies to class-conditional models only; this one is unconditional")
    images = G(latents(num, info["model"]["latent_dim"], seed, truncation), labels)
    target = Path(out)
    if target.suffix.lower() == ".png":
        save_samples(images, target)
        return target
    if images.dim() != 4:
        raise UserError("this model draws 2-D points: give --out a .png file for a scatter plot")
    target.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(to_uint8(images).permute(0, 2, 3, 1).numpy()):
        Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image).save(target / f"{i:06d}.png")
    return target


def add_export_arguments(parser) -> None:
    parser.add_argument("--run", required=True, help="run directory (runs/<name>)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    parser.add_argument("--out", required=True, help="directory to write G_ema.safetensors and model.json")
    parser.add_argument("--force", action="store_true", help="replace an existing --out")


def add_sample_arguments(parser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", default="", help="an exported model directory")
    source.add_argument("--run", default="", help="a run directory (its latest checkpoint, or --step)")
    parser.add_argument("--step", type=int, default=None, help="with --run: checkpoint step (default: latest)")
    parser.add_argument("--num", type=int, default=64, help="number of samples")
    parser.add_argument("--out", required=True,
                        help="grid.png for one grid (ceil(sqrt(NUM)) samples a row, each framed by a 1-pixel "
                             "dark grey border; samples under 17 px enlarged, 8 px ones 4x; 2-D points: a 512 px "
                             "scatter plot), or a directory for one PNG each at the model's size")
    parser.add_argument("--seed", type=int, default=0, help="seed of the latents")
    parser.add_argument("--truncation", type=float, default=0.0,
                        help="redraw latent values beyond +-T (e.g. 1.5); 0 = off")
    parser.add_argument("--class", dest="class_index", type=int, default=None,
                        help="conditional models: draw only this class (default: all classes in turn)")


def run_export(args) -> int:
    target = export(args.run, args.step, args.out, args.force)
    info = json.loads((target / "model.json").read_text())
    print(f"exported G_ema of step {info['step']} to {target}")
    return 0


def run_sample(args) -> int:
    if args.num < 1:
        raise UserError(f"--num must be >= 1, got {args.num}")
    if args.truncation != 0 and args.truncation < 0.1:
        raise UserError(f"--truncation must be 0 (off) or at least 0.1, got {args.truncation}")
    if args.model and args.step is not None:
        raise UserError("--step applies to --run; an exported model has one step")
    suffix = Path(args.out).suffix.lower()
    if suffix and suffix != ".png":
        raise UserError(f"--out {args.out}: give a .png file for a grid, or a directory (no suffix) for one PNG each")
    target = sample(args.model, args.run, args.step, args.num, args.out, args.seed, args.truncation, args.class_index)
    print(f"wrote {args.num} samples to {target}")
    return 0
