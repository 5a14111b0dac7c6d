"""`gan-dist eval --run DIR [--step N] --metrics fid,kid,is,modes2d,cls --num N [--json]`.

Runs on one process or under torchrun / accelerate launch (the work is split by rank)."""

from __future__ import annotations

import json
from pathlib import Path

from gan_dist.errors import UserError


def add_arguments(parser) -> None:
    parser.add_argument("--run", required=True, help="run directory (runs/<name>)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    parser.add_argument("--metrics", default="fid", help="comma-separated: fid,kid,is,modes2d,cls (default fid)")
    parser.add_argument("--num", type=int, default=10_000, help="generated samples (modes2d always uses 2,500)")
    parser.add_argument("--reference-num", type=int, default=0,
                        help="real samples for FID/KID: 0 = the whole training set; fewer = the first N of a "
                             "dataset shuffled at prepare time, else a seeded random N")
    parser.add_argument("--data", default="", help="the dataset (default: the run's data.path or built-in dataset)")
    parser.add_argument("--inception-weights", default="", help="local weights-inception-2015-12-05-6726825d.pth")
    parser.add_argument("--allow-download", action="store_true", help="fetch the Inception weights if missing")
    parser.add_argument("--cache-dir", default="", help="reference features and classifiers (~/.cache/gan_dist/eval)")
    parser.add_argument("--batch", type=int, default=250, help="samples per generator/extractor call")
    parser.add_argument("--seed", type=int, default=0, help="seed of the latents")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args) -> int:
    from gan_dist import parallel
    from gan_dist.eval import check_metrics
    from gan_dist.eval.run import EvalOptions, evaluate

    metrics = check_metrics([m.strip() for m in args.metrics.split(",") if m.strip()])
    if args.num < 2 or args.batch < 1:
        raise UserError(f"--num must be >= 2 and --batch >= 1 (got {args.num}, {args.batch})")
    opts = EvalOptions(metrics=metrics, num=args.num, batch=args.batch, seed=args.seed,
                       reference_num=args.reference_num, inception_weights=args.inception_weights,
                       allow_download=args.allow_download, cache_dir=args.cache_dir)
    accelerator = parallel.build_accelerator("no", Path(args.run), tensorboard=False)
    target, step = load_target(Path(args.run), args.step, args.data, accelerator.device)
    # With --json stdout is for the JSON alone (scripts parse it): the progress goes to stderr.
    results = evaluate(target, opts, accelerator, console=_stderr_console() if args.json else None)
    if accelerator.is_main_process:
        report = {"run": args.run, "step": step, "processes": accelerator.num_processes, "results": results}
        print(json.dumps(report, indent=1)) if args.json else print_table(report)
    return 0


def _stderr_console():
    import sys

    from rich.console import Console

    return Console(stderr=True, force_terminal=sys.stderr.isatty(), highlight=False, soft_wrap=not sys.stderr.isatty())


def load_target(run_dir: Path, step: int | None, data_override: str, device):
    """G_ema of a checkpoint, and the dataset the run trained on."""
    from gan_dist import config as config_mod
    from gan_dist.checkpoint import load_generator, snapshot_dir
    from gan_dist.data.stream import open_dataset
    from gan_dist.eval.run import Target
    from gan_dist.run import dataset_path

    snapshot = snapshot_dir(run_dir, step)
    G, info = load_generator(snapshot)
    config_file = run_dir / "config.yaml"
    if not config_file.is_file() and not data_override:
        raise UserError(f"{run_dir} has no config.yaml to find its dataset; give --data DIR")
    cfg = config_mod.load_config(str(config_file), []) if config_file.is_file() else None
    data = open_dataset(data_override or dataset_path(cfg))
    if list(data.shape) != list(info["shape"]):
        raise UserError(f"the dataset has samples of shape {list(data.shape)} but G draws {info['shape']}; "
                        "give --data with the run's dataset")
    name = cfg.data.dataset if cfg is not None else ""
    target = Target(G.to(device), info["model"]["latent_dim"], info["num_classes"] if info["model"]["conditional"]
                    else 0, data, name)
    return target, info.get("step")


def print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{report['run']} step {report['step']} ({report['processes']} process(es))")
    for column in ("metric", "value", "samples", "reference", "tool"):
        table.add_column(column)
    for metric, r in report["results"].items():
        if metric == "modes2d":
            value = f"{r['modes']}/{r['num_modes']} modes, {100 * r['hq_fraction']:.1f}% HQ, rev-KL {r['reverse_kl']:.4f}"
            table.add_row(metric, value, str(r["num_samples"]), r["reference"], r["tool"])
        elif metric == "cls":
            real = r["real_heldout"]
            shares, names = r["class_fractions"], r.get("class_names") or []
            classes = (", ".join(f"{name} {share:.1%}" for name, share in zip(names, shares)) if len(names) <= 4
                       else f"{min(shares):.1%}-{max(shares):.1%}")
            value = (f"IS {r['is']:.2f} (real {real['is']:.2f}), FD {r['fd']:.3f} (real {real['fd']:.3f}), classes "
                     f"{classes}, spread_ratio {r['spread_ratio']:.2f} (1: as varied as the real images; "
                     f"raw {r['raw_spread_ratio']:.2f})")
            table.add_row(metric, value, str(r["num"]), r["reference"], r["tool"])
        else:
            value = f"{r['value']:.4g}" + (f" ± {r['std']:.2g}" if "std" in r else "")
            table.add_row(metric, value, str(r["num_generated"]), r["reference"], r["tool"])
    Console().print(table)
