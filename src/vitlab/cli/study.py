"""`vitlab compare`, `vitlab sweep` and `vitlab report`: studies of several configurations with K seeds each."""

from __future__ import annotations

import argparse

from vitlab.cli.parser import MODEL_HELP, add_settings_flags, given_settings, model_argument, positive_int
from vitlab.study.plan import BUDGETS, SEED_STUDY


def add_study_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="study folder (created; an existing one of the same study is resumed)")
    parser.add_argument("--seeds", type=positive_int, default=3, help="seeds per SPEC (default 3); seeds are --seed, --seed+1, ...")
    parser.add_argument("--budget", choices=list(BUDGETS), help="named budget: " + "; ".join(f"{k} = {v}" for k, v in BUDGETS.items())
                        + " (flags given win)")
    parser.add_argument("--jobs", type=positive_int, default=1, help="runs trained at once, CPU threads split between them (default 1)")
    parser.add_argument("--launcher", choices=["local", "slurm", "submitit-local"], default="local",
                        help="local (this machine, --jobs at a time), slurm (each run a Slurm job, through submitit) or "
                             "submitit-local (submitit's local executor: each run its own process)")
    parser.add_argument("--reuse", action="append", default=[], metavar="STUDY_DIR",
                        help="copy finished runs with exactly the same config (and seed) from this study folder instead of training "
                             "them again (repeatable); each copy's results.json names its source")
    parser.add_argument("--slurm", action="append", default=[], metavar="KEY=VALUE",
                        help="a Slurm parameter for --launcher slurm, e.g. --slurm partition=gpu --slurm timeout_min=120")
    add_settings_flags(parser)


def add_parser(commands) -> None:
    compare = commands.add_parser("compare", help="train several models under one budget, K seeds each; tables and figures",
                                  description="Train every SPEC (a model or preset, optionally with settings of any kind such as "
                                  "vit:patch_size=4,lr=0.001, cnn:widths=16/32 or timm:resnet18) under the same budget with --seeds K seeds; the "
                                  "first SPEC is the baseline. With --vary, every SPEC once per value (a grid). With no SPEC: the "
                                  "seeds' study (cnn-small vs ViT at patch 2, 4, 6, 8, and their MLP). Running the same command "
                                  "again resumes an interrupted study.")
    compare.add_argument("specs", nargs="*", metavar="SPEC", help=f"models to compare (default: {' '.join(SEED_STUDY)})")
    compare.add_argument("--vary", metavar="FIELD=v1,v2,...", help="also vary one setting for every SPEC (e.g. train_size=1000,5000,40000)")
    add_study_flags(compare)

    sweep = commands.add_parser("sweep", help="vary one setting under one budget, K seeds each",
                                description="Train --model (or --preset) once per value of --vary FIELD=v1,v2,... (any model, data or "
                                "training setting; a tuple value as 16/32) under the same budget; the first value is the baseline.")
    sweep.add_argument("--vary", required=True, metavar="FIELD=v1,v2,...", help="the setting to vary and its values")
    sweep.add_argument("--model", type=model_argument, metavar="MODEL", help=f"architecture to sweep: {MODEL_HELP} (default vit)")
    sweep.add_argument("--preset", help="sweep around a named recipe instead")
    add_study_flags(sweep)

    report = commands.add_parser("report", help="write a self-contained report of a study folder",
                                 description="Write report.md (and with --html report.html, its own figures embedded) into STUDY_DIR.")
    report.add_argument("study_dir", metavar="STUDY_DIR")
    report.add_argument("--html", action="store_true", help="also write report.html with the figures embedded")


def run_compare(args: argparse.Namespace) -> None:
    from vitlab.study.plan import plan_study

    plan = plan_study(list(args.specs or SEED_STUDY), given_settings(args), args.budget, args.seeds, kind="compare", vary=args.vary)
    finish(args, plan)


def run_sweep(args: argparse.Namespace) -> None:
    from vitlab.errors import VitlabError
    from vitlab.study.plan import plan_study

    if args.preset and args.model:
        raise VitlabError("give --model or --preset, not both")
    plan = plan_study([args.preset or args.model or "vit"], given_settings(args), args.budget, args.seeds, kind="sweep", vary=args.vary)
    finish(args, plan)


def finish(args: argparse.Namespace, plan) -> None:
    from vitlab.study.execute import run_study
    from vitlab.study.launch import slurm_parameters
    from vitlab.study.summary import summarize_study

    run_study(plan, args.out, jobs=args.jobs, command=args.command_line, launcher=args.launcher,
              slurm=slurm_parameters(args.slurm), reuse=args.reuse)
    summary = summarize_study(args.out)
    print(summary.markdown_table())
    print(f"tables and figures in {args.out}; write a report with: vitlab report {args.out}")


def run_report(args: argparse.Namespace) -> None:
    from vitlab.study.report import write_report

    for path in write_report(args.study_dir, html=args.html):
        print(f"wrote {path}")
