"""``python -m surgery.apply CFG.yaml``: load the model, swap in adapters, print the plan, train, save.

    python -m surgery.apply configs/demo.yaml                 # surgery + training + checkpoint
    python -m surgery.apply cfg.yaml --dry-run                # plan only: config.json suffices, no weights
    python -m surgery.apply cfg.yaml --dry-run --report plan.json
    python -m surgery.apply cfg.yaml --output-dir runs/try2 --resume
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from accelerate.utils import set_seed

from surgery.checkpoint import CheckpointError, save_checkpoint
from surgery.config import ConfigError, SurgeryConfig, check_max_length, check_output_dir, load_config
from surgery.model import ModelLoadError, load_hf_config, load_model, load_tokenizer
from surgery.report import build_report, format_table, write_report
from surgery.rewrite import AdaptedModel, apply_surgery
from surgery.targets import TargetError

USER_ERRORS = (ConfigError, TargetError, ModelLoadError, CheckpointError, ValueError, FileNotFoundError)
log = logging.getLogger("surgery")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m surgery.apply", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", type=Path, help="YAML config (see README: Config keys)")
    parser.add_argument("--dry-run", action="store_true",
                        help="stop after the plan table; reads config.json only and allocates no weights")
    parser.add_argument("--report", type=Path, help="write the plan as JSON to this file")
    parser.add_argument("--output-dir", type=Path, help="override output_dir from the config")
    parser.add_argument("--resume", action="store_true", help="continue training from output_dir's last checkpoint")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="with --resume: change train.lr, train.max_steps, train.epochs or train.max_grad_norm "
                             "of the resumed run (repeatable)")
    parser.add_argument("--overwrite", action="store_true",
                        help="train from scratch into an output_dir holding an earlier run's checkpoints (removes them)")
    return parser.parse_args(argv)


def plan(config: SurgeryConfig, dry_run: bool) -> AdaptedModel:
    """Load (empty weights on a dry run) and rewrite the model."""
    model = load_model(config.model, meta=dry_run)
    return apply_surgery(model, config)


def check_files(config: SurgeryConfig, dry_run: bool) -> None:
    """What the config names on disk, before any weight is read: output_dir can be made, the data files exist (a
    dry run reads none) and train.data.max_length fits the positions in the model's config.json."""
    check_output_dir(config.output_dir)
    if config.train is None:
        return
    if not dry_run:
        from train.data import check_paths

        check_paths(config.train.data)
    check_max_length(config, load_hf_config(config.model))


def resume_overrides(args: argparse.Namespace) -> dict[str, object]:
    """``--override KEY=VALUE`` as ``{key: value}``; only with --resume (a new run sets its keys in the config)."""
    if not args.override:
        return {}
    if not args.resume:
        raise ConfigError(f"--override {args.override[0]}: --override changes a resumed run and needs --resume; "
                          f"for a new run set the key in the config")
    from train.resume import parse_overrides

    return parse_overrides(args.override)


def run(args: argparse.Namespace) -> int:
    overrides = {"output_dir": str(args.output_dir)} if args.output_dir else None
    config = load_config(args.config, overrides=overrides)
    overridden = resume_overrides(args)
    if overridden:
        from train.resume import apply_overrides

        config = apply_overrides(config, overridden)
    check_files(config, dry_run=args.dry_run)
    if not args.dry_run:
        from train.state import check_start

        if config.train is not None:
            from train.trainer import check_launch_environment

            check_launch_environment()  # an unsupported accelerate set-up fails before the model loads
        # an earlier run's checkpoints, likewise (a surgery-only run would overwrite them too)
        check_start(config.output_dir, args.resume and config.train is not None, args.overwrite)
    set_seed(config.train.seed if config.train else 0)  # adapter and head initialisation repeat run to run
    adapted = plan(config, dry_run=args.dry_run)
    report = build_report(adapted)
    if int(os.environ.get("RANK", "0")) == 0:  # under accelerate launch, one table, not one per process
        print(format_table(report))
    if args.report:
        write_report(report, args.report)
        print(f"plan written to {args.report}")
    if args.dry_run:
        return 0
    if config.train is not None:
        from train.trainer import train_adapters

        metrics = train_adapters(adapted, load_tokenizer(config.model), config.output_dir, resume=args.resume,
                                 overridden=tuple(overridden), overwrite=args.overwrite)
        print("final metrics: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    else:
        save_checkpoint(adapted, config.output_dir)
    print(f"checkpoint saved to {config.output_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    try:
        return run(args)
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
