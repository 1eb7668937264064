"""`vitlab train`: train a model (or resume a stopped run) and write a run folder."""

from __future__ import annotations

import argparse

from vitlab.cli.parser import MODEL_HELP, add_settings_flags, given_settings, model_argument
from vitlab.errors import VitlabError
from vitlab.presets import DEFAULT_MODEL, build_run_config


def add_parser(commands) -> None:
    train = commands.add_parser("train", help="train a model and write a run folder",
                                description="Train a model on CIFAR-10; writes config, metrics, weights, results and curves to --out.")
    train.add_argument("--model", type=model_argument, metavar="MODEL", help=f"architecture: {MODEL_HELP} (default {DEFAULT_MODEL})")
    train.add_argument("--preset", help="start from a named recipe (see 'vitlab models')")
    train.add_argument("--out", help="run folder to create (default runs/<model>-<time>)")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run from its checkpoint (takes no other settings)")
    add_settings_flags(train)


def run(args: argparse.Namespace) -> None:
    from vitlab.rundir import results_summary
    from vitlab.train.distributed import shutdown
    from vitlab.train.run import resume_run, train_run

    try:
        if args.resume:
            given = sorted(given_settings(args)) + [name for name in ("model", "preset", "out") if getattr(args, name)]
            if given:
                raise VitlabError(f"--resume continues a run with its saved settings; drop --{given[0]}")
            results = resume_run(args.resume)
        else:
            results = train_run(build_run_config(args.model, args.preset, given_settings(args)), args.out)
    finally:
        shutdown()
    if "rank" in results:  # a data-parallel process other than rank 0: rank 0 reports
        return
    print(f"{results_summary(results)}; results in {results['out_dir']}")
