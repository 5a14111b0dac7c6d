"""One evaluation of a generator: the requested metrics, computed over every process.

Every process generates and extracts its share (gan_dist.eval.collect); rank 0 computes the
numbers and broadcasts them, so every rank returns the same dict. Each result records the
tool, the sample counts and the reference it was compared with.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gan_dist.config import EvalConfig as EvalOptions  # the options of one evaluation
from gan_dist.data.stream import DatasetInfo
from gan_dist.errors import UserError
from gan_dist.eval import check_metrics, collect, scores
from gan_dist.eval import classifier as cls_mod
from gan_dist.eval.modes2d import NUM_SAMPLES as MODES2D_SAMPLES
from gan_dist.eval.modes2d import mode_coverage
from gan_dist.progress import ProgressFactory, task_progress

INCEPTION_METRICS = {"fid", "kid", "is"}
MIXTURES = ("ring8", "grid25")


@dataclass
class Target:
    """What is evaluated: G (eval mode) and what it was trained on."""

    G: torch.nn.Module
    latent_dim: int
    num_classes: int
    data: DatasetInfo
    dataset_name: str  # the built-in name (ring8, digits, ...) or '' for other data


def cache_dir(opts: EvalOptions) -> Path:
    if opts.cache_dir:
        return Path(opts.cache_dir)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "gan_dist" / "eval"


def evaluate(target: Target, opts: EvalOptions, accelerator, extractors: dict | None = None,
             console=None) -> dict[str, dict]:
    """{metric: {value(s), tool, counts, reference}}; the same on every rank. Rank 0 shows the
    progress of each long step on `console` (a rich Console; default: stdout)."""
    check_metrics(opts.metrics)
    extractors = extractors or {}
    ctx = (accelerator.process_index, accelerator.num_processes, accelerator.device)
    show = _progress_on_rank0(ctx, console)
    results: dict[str, dict] = {}
    if "modes2d" in opts.metrics:
        results["modes2d"] = _modes2d(target, opts, ctx)
    if INCEPTION_METRICS & set(opts.metrics):
        results.update(_inception_metrics(target, opts, ctx, extractors.get("inception"), show))
    if "cls" in opts.metrics:
        results["cls"] = _classifier_metrics(target, opts, ctx, extractors.get("classifier"), show)
    return results


def _progress_on_rank0(ctx, console) -> Callable[..., ProgressFactory]:
    """show(description, shared=True) -> a progress factory that prints on rank 0 only; with
    several processes a shared step counts rank 0's part of the work."""
    rank, world, _ = ctx

    def show(description: str, shared: bool = True) -> ProgressFactory:
        label = f"{description} (rank 0's part of {world})" if shared and world > 1 else description
        return functools.partial(task_progress, label, enabled=rank == 0, console=console)

    return show


def _modes2d(target: Target, opts: EvalOptions, ctx) -> dict:
    if target.dataset_name not in MIXTURES or target.data.shape != (2,):
        raise UserError(f"modes2d scores the 2-D mixtures ({', '.join(MIXTURES)}); this run's data has samples "
                        f"of shape {list(target.data.shape)}")
    points = collect.generated(target.G, target.latent_dim, 0, MODES2D_SAMPLES, opts.batch, opts.seed, *ctx, None)
    result = _on_rank0(ctx, lambda: mode_coverage(points["samples"].cpu().numpy(), target.dataset_name))
    return {**result, "tool": "gan_dist modes2d (PacGAN protocol: HQ within 3 std)", "reference": target.dataset_name}


def _inception_metrics(target: Target, opts: EvalOptions, ctx, extractor, show) -> dict[str, dict]:
    from gan_dist.eval.features import InceptionFeatures

    if len(target.data.shape) != 3:
        raise UserError("FID, KID and IS need images; for the 2-D mixtures use --metrics modes2d")
    extractor = extractor or InceptionFeatures(opts.inception_weights, opts.allow_download).to(ctx[2])
    gen = collect.generated(target.G, target.latent_dim, target.num_classes, opts.num, opts.batch, opts.seed,
                            *ctx, extractor, show("eval: Inception features of generated samples"))
    wanted = set(opts.metrics)
    reference, selection = None, None
    if wanted & {"fid", "kid"}:
        selection = collect.reference_selection(target.data, opts.reference_num, opts.seed)
        reference = _cached_reference(target.data, extractor, selection, opts, ctx,
                                      show(f"eval: Inception features of the real samples ({selection.rule})"))
    tool = f"torch-fidelity, {getattr(extractor, 'name', 'custom extractor')}"

    def compute() -> dict[str, dict]:
        out = {}
        counts = {"num_generated": len(gen["features"]), "tool": tool}
        # Only rank 0 holds the reference features, so the note is made here.
        ref_note = f"{len(reference['features'])} real samples ({selection.rule})" if reference else ""
        if "fid" in wanted:
            value = scores.frechet_distance(scores.statistics(gen["features"]), scores.statistics(reference["features"]))
            out["fid"] = {"value": value, **counts, "reference": ref_note}
        if "kid" in wanted:
            mean, std = scores.kernel_distance(gen["features"], reference["features"])
            subset = min(scores.KID_SUBSET_SIZE, len(gen["features"]), len(reference["features"]))
            out["kid"] = {"value": mean, "std": std, **counts, "reference": ref_note,
                          "subsets": scores.KID_SUBSETS, "subset_size": subset}
        if "is" in wanted:
            mean, std = scores.inception_score(gen["logits"])
            out["is"] = {"value": mean, "std": std, **counts, "splits": scores.IS_SPLITS, "reference": "none"}
        return out

    return _on_rank0(ctx, compute)


def _cached_reference(data: DatasetInfo, extractor, selection: collect.Selection, opts, ctx,
                      progress: ProgressFactory | None = None) -> dict:
    """Real features on rank 0 ({} elsewhere), extracted once per (dataset content, selection,
    extractor) and cached; `progress` shows the extraction (a cached reference shows nothing)."""
    rank, world, device = ctx
    name = getattr(extractor, "name", "")
    path = cache_dir(opts) / f"{collect.dataset_key(data, selection)}-{name}.pt" if name else None
    have = torch.tensor([1 if path is not None and path.is_file() else 0], device=device)
    _broadcast_tensor(have)  # rank 0 decides, so no rank waits in a gather the others skip
    if have.item():
        return torch.load(path, map_location="cpu", weights_only=True) if rank == 0 else {}
    features = collect.real(data, selection, opts.batch, rank, world, device, extractor, progress)
    if rank == 0 and path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(features, path.with_suffix(".tmp"))
        path.with_suffix(".tmp").replace(path)
    return features


def _classifier_metrics(target: Target, opts: EvalOptions, ctx, model, show) -> dict:
    if len(target.data.shape) != 3 or target.data.num_classes < 2:
        raise UserError("cls needs a labelled image dataset: digits, mnist, fashionmnist, or an image folder "
                        "prepared with at least two class subfolders")
    device = ctx[2]
    model = (model or _classifier(target.data, opts, ctx, show)).to(device)
    gen = collect.generated(target.G, target.latent_dim, target.num_classes, opts.num, opts.batch, opts.seed,
                            *ctx, model, show("cls: classifier features of generated samples"))
    held_out = cls_mod.held_out(np.arange(target.data.count))
    train_part = _cached_reference(target.data, model, collect.Selection(
        f"cls training part: index % {cls_mod.HOLDOUT_EVERY} != 0", target.data.count, ~held_out), opts, ctx,
        show("cls: classifier features of the real training part"))
    test_part = _cached_reference(target.data, model, collect.Selection(
        f"cls held-out part: index % {cls_mod.HOLDOUT_EVERY} == 0", target.data.count, held_out), opts, ctx,
        show("cls: classifier features of the real held-out part"))

    def summary(features: dict) -> dict:
        is_mean, is_std = scores.inception_score(features["logits"])
        fd = scores.frechet_distance(scores.statistics(features["features"]),
                                     scores.statistics(train_part["features"]))
        histogram = torch.bincount(features["logits"].argmax(1).cpu(), minlength=target.data.num_classes)
        return {"is": is_mean, "is_std": is_std, "fd": fd, "num": len(features["features"]),
                "class_fractions": (histogram / histogram.sum()).tolist(),
                "spread": scores.mean_pairwise_distance(features["features"], unit=True),
                "raw_spread": scores.mean_pairwise_distance(features["features"])}

    def compute() -> dict:
        fake, real = summary(gen), summary(test_part)
        return {**fake, "real_heldout": real, "spread_ratio": fake["spread"] / max(real["spread"], 1e-12),
                "raw_spread_ratio": fake["raw_spread"] / max(real["raw_spread"], 1e-12),
                "class_names": list(target.data.classes),
                "tool": f"gan_dist {getattr(model, 'name', '')}",
                "reference": f"{len(train_part['features'])} real training samples (FD); ceiling on "
                             f"{len(test_part['features'])} held-out real samples"}

    return _on_rank0(ctx, compute)


def _classifier(data: DatasetInfo, opts: EvalOptions, ctx, show) -> torch.nn.Module:
    """The dataset's classifier: rank 0's cached one, or trained on rank 0; sent to the others."""
    import hashlib

    rank, world, device = ctx
    path = cache_dir(opts) / f"{collect.dataset_key(data)}-classifier-{cls_mod.ARCHITECTURE}.safetensors"
    have = torch.tensor([1 if path.is_file() else 0], device=device)
    _broadcast_tensor(have)
    model = cls_mod.load(path) if have.item() and rank == 0 else None
    if not have.item():
        # uint8 samples on rank 0 only; a large dataset trains it on a subset.
        selection = collect.reference_selection(data, cls_mod.MAX_TRAINING_SAMPLES, opts.seed)
        real = collect.real(data, selection, opts.batch, rank, world, device, None,
                            show(f"cls: reading the classifier's samples ({selection.rule})"))
        if rank == 0:
            train = ~torch.from_numpy(cls_mod.held_out(real["index"].numpy()))
            samples, labels = real["samples"], real["labels"]
            model = cls_mod.train_classifier(samples[train], labels[train], data.num_classes,
                                             progress=show("cls: training the classifier (once per dataset)", False))
            acc = cls_mod.accuracy(model, samples[~train], labels[~train])
            cls_mod.save(model, path, {"channels": data.shape[0], "num_classes": data.num_classes,
                                       "heldout_accuracy": acc, "dataset_key": collect.dataset_key(data)})
    model = _broadcast_object(model, rank)
    # Cached real features are keyed by the weights, so a retrained classifier gets new ones.
    digest = hashlib.sha256(b"".join(t.cpu().numpy().tobytes() for t in model.state_dict().values()))
    model.name = f"classifier-{digest.hexdigest()[:12]}"
    return model


def _on_rank0(ctx, compute):
    """Rank 0 computes (the others may hold only their share of the inputs), all get it."""
    return _broadcast_object(compute() if ctx[0] == 0 else None, ctx[0])


def _broadcast_object(obj, rank: int):
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return obj
    box = [obj if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _broadcast_tensor(tensor: torch.Tensor) -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast(tensor, src=0)
