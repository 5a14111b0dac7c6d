"""`gan-dist train|prepare|export|sample|eval|plot|check`: the console script."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gan_dist.errors import run_reporting_errors


def _check(args) -> int:
    """Validate a config as training would before its first step, without starting a run:
    keys and types, plugins, model and loss names, the batch split over --world-size
    processes, and (when it exists already) the dataset and the models built for it."""
    from gan_dist import config as config_mod
    from gan_dist import config_checks, parallel
    from gan_dist.data.stream import open_dataset
    from gan_dist.losses import get_loss
    from gan_dist.models import build_models, get_builder
    from gan_dist.run import dataset_path
    from gan_dist.train import import_plugins

    cfg = config_mod.load_config(args.config, args.overrides)
    for note in config_checks.notes(cfg, config_mod.given_keys(args.config, args.overrides)):
        print(f"note: {note}", file=sys.stderr)  # stderr: train.sh reads --print-run-dir's stdout
    import_plugins(cfg.plugins)
    get_builder(cfg.model.name)
    get_loss(cfg.loss.name)
    parallel.batch_per_device(cfg.train.batch_size, args.world_size, cfg.train.num_micro_batches)
    # A built-in dataset that is not there yet is prepared by the run itself; an explicit
    # data.path must exist now.
    if cfg.data.path or Path(dataset_path(cfg)).exists():
        info = open_dataset(dataset_path(cfg))
        _, D = build_models(cfg.model, info.shape, info.num_classes or cfg.data.num_classes)
        parallel.check_sync_bn(cfg, D)
    if args.print_run_dir:
        print(Path(cfg.run.root) / cfg.run.name)  # for launch scripts, which look for the REQUEUE marker
    else:
        print(config_mod.to_yaml(cfg), end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:
        from gan_dist.train import main as train_main

        return train_main(argv[1:], prog="gan-dist train")
    parser = argparse.ArgumentParser(prog="gan-dist", description="gan_dist command line")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("train", help="train a GAN (same as python train.py; see gan-dist train --help)")
    from gan_dist.data import prepare

    prepare.add_arguments(sub.add_parser("prepare", help="write a dataset as webdataset shards"))
    from gan_dist import export

    export.add_export_arguments(sub.add_parser("export", help="write a run's G_ema as a standalone model"))
    export.add_sample_arguments(sub.add_parser("sample", help="draw samples from a run or an exported model"))
    from gan_dist.eval import cli as eval_cli

    eval_cli.add_arguments(sub.add_parser("eval", help="FID/KID/IS, mode coverage or classifier scores of a run"))
    from gan_dist import plot

    plot.add_arguments(sub.add_parser("plot", help="a run's losses, logits, gradient norms, speed and metrics as a PNG"))
    check = sub.add_parser("check", help="validate a config and print it resolved")
    check.add_argument("config")
    check.add_argument("overrides", nargs="*", metavar="key=value")
    check.add_argument("--print-run-dir", action="store_true", help="print only the run directory")
    check.add_argument("--world-size", type=int, default=1, metavar="N",
                       help="check that the batch splits over N processes (default 1)")
    for p in sub.choices.values():
        p.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)
    handlers = {"prepare": prepare.run, "check": _check, "export": export.run_export, "sample": export.run_sample,
                "eval": eval_cli.run, "plot": plot.run}
    return run_reporting_errors(lambda: handlers[args.command](args), args.debug)


if __name__ == "__main__":
    sys.exit(main())
