"""The `vitlab` command line. Flags are derived from the config dataclasses, so every config field
is a flag (in both the seeds' `--batch_size` and the `--batch-size` spelling)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shlex
import sys
import typing
from collections.abc import Sequence
from pathlib import Path

from vitlab.config import DataConfig, RunConfig, TrainConfig, flag_parser
from vitlab.errors import VitlabError
from vitlab.models import MODELS, build_model
from vitlab.presets import DEFAULT_MODEL, PRESETS, build_run_config
from vitlab.study import BUDGETS, SEED_STUDY


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line (plus the --help hint), exit status 2."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def docstring_args(cls: type) -> dict[str, str]:
    """The `name: text` lines of a dataclass's `Args:` docstring section, for --help."""
    return dict(re.findall(r"^\s+(\w+): (.+)$", cls.__doc__ or "", flags=re.MULTILINE))


def add_config_flags(group, cls: type, seen: set[str], help_override: dict[str, str] | None = None) -> None:
    """One flag per field of `cls` (default None = 'not given'); fields shared by models are added once."""
    hints, help_texts = typing.get_type_hints(cls), docstring_args(cls) | (help_override or {})
    for config_field in dataclasses.fields(cls):
        name = config_field.name
        if name in seen:
            continue
        seen.add(name)
        spellings = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
        group.add_argument(*spellings, dest=name, type=flag_parser(hints[name]), default=None,
                           metavar=name.upper(), help=help_texts.get(name, ""))


def model_flag_help() -> dict[str, str]:
    """Help for each model setting, naming the models that have it: '[vit] token width ...; [mlp] width of ...'."""
    texts: dict[str, dict[str, list[str]]] = {}
    for model_name, cls in MODELS.items():
        for name, text in docstring_args(cls.config_class).items():
            texts.setdefault(name, {}).setdefault(text, []).append(model_name)
    return {name: "; ".join(f"[{', '.join(models)}] {text.rstrip('.')}" for text, models in by_text.items()) for name, by_text in texts.items()}


def add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """Every model, data and training setting as a flag."""
    seen: set[str] = {"model", "preset"}
    model_group = parser.add_argument_group("model settings (each applies to the models that have it)")
    model_help = model_flag_help()
    for cls in MODELS.values():
        add_config_flags(model_group, cls.config_class, seen, model_help)
    add_config_flags(parser.add_argument_group("data settings"), DataConfig, seen)
    add_config_flags(parser.add_argument_group("training settings"), TrainConfig, seen)


def add_inspection_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", type=int, default=4, help="how many test images to show when no files are given (default 4)")
    parser.add_argument("--out", help="folder for the figures (default RUN_DIR/figures)")
    parser.add_argument("--data-dir", "--data_dir", dest="data_dir", help="folder holding CIFAR-10")


def add_study_flags(parser: argparse.ArgumentParser, with_model: bool = False) -> None:
    if with_model:
        parser.add_argument("--model", choices=list(MODELS), help="architecture to sweep (default vit)")
        parser.add_argument("--preset", help="sweep around a named recipe instead")
    parser.add_argument("--out", required=True, help="study folder (created; an existing one of the same study is resumed)")
    parser.add_argument("--seeds", type=int, default=2, help="seeds per model (default 2); seeds are --seed, --seed+1, ...")
    parser.add_argument("--budget", choices=list(BUDGETS), help="named budget: " + "; ".join(f"{k} = {v}" for k, v in BUDGETS.items())
                        + " (flags given win)")
    parser.add_argument("--jobs", type=int, default=1, help="runs trained at once, CPU threads split between them (default 1)")
    add_settings_flags(parser)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="vitlab", description="Train, compare and look inside ViTs and CNNs on CIFAR-10.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineErrorParser)

    train = commands.add_parser("train", help="train a model and write a run folder",
                                description="Train a model on CIFAR-10; writes config, metrics, weights, results and curves to --out.")
    train.add_argument("--model", choices=list(MODELS), help=f"architecture (default {DEFAULT_MODEL})")
    train.add_argument("--preset", help="start from a named recipe (see 'vitlab models')")
    train.add_argument("--out", help="run folder to create (default runs/<model>-<time>)")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run from its checkpoint (takes no other settings)")
    add_settings_flags(train)

    compare = commands.add_parser("compare", help="train several models under one budget, K seeds each; tables and figures",
                                  description="Train every SPEC (a model or preset, optionally with overrides such as "
                                  "vit:patch_size=4,num_blocks=6) under the same budget with --seeds K seeds; the first SPEC "
                                  "is the baseline. With no SPEC: the seeds' study (cnn-small vs ViT at patch 2, 4, 6, 8). "
                                  "Running the same command again resumes an interrupted study.")
    compare.add_argument("specs", nargs="*", metavar="SPEC", help=f"models to compare (default: {' '.join(SEED_STUDY)})")
    add_study_flags(compare)

    sweep = commands.add_parser("sweep", help="vary one model setting under one budget, K seeds each",
                                description="Train --model (or --preset) once per value of --vary FIELD=v1,v2,... "
                                "under the same budget; the first value is the baseline.")
    sweep.add_argument("--vary", required=True, metavar="FIELD=v1,v2,...", help="the model setting to vary and its values")
    add_study_flags(sweep, with_model=True)

    report = commands.add_parser("report", help="write a self-contained report of a study folder",
                                 description="Write report.md (and with --html report.html, images embedded) into STUDY_DIR.")
    report.add_argument("study_dir", metavar="STUDY_DIR")
    report.add_argument("--html", action="store_true", help="also write report.html with the figures embedded")

    evaluate = commands.add_parser("evaluate", help="test a saved run and print JSON")
    evaluate.add_argument("run_dir", metavar="RUN_DIR")
    evaluate.add_argument("--data-dir", "--data_dir", dest="data_dir", help="folder holding CIFAR-10")
    evaluate.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], help="device to evaluate on")
    evaluate.add_argument("--figures", nargs="?", const="", metavar="DIR",
                          help="also write confusion matrix, per-class accuracy and most confident mistakes (default DIR: RUN_DIR/figures)")

    attention = commands.add_parser("attention", help="ViT attention maps per layer and head, rollout, attention distance",
                                    description="Write one PNG per image: the image, each layer's attention (CLS-to-patch, or "
                                    "attention received per patch for mean pooling), and the attention rollout, with predicted "
                                    "and true class; plus attention_distance.png (mean attention distance per layer and head).")
    attention.add_argument("run_dir", metavar="RUN_DIR", help="a ViT run folder")
    attention.add_argument("files", nargs="*", metavar="IMAGE", help="image files (default: the first --images test images)")
    add_inspection_flags(attention)
    attention.add_argument("--layer", default="all", help="layer number (1-based) or all (default)")
    attention.add_argument("--head", default="mean", help="head number (1-based), mean (default) or all")
    attention.add_argument("--method", default="raw", choices=["raw", "rollout"],
                           help="what each layer panel shows: its own attention (raw) or the rollout up to it")

    explain = commands.add_parser("explain", help="CNNs and ViTs side by side: Grad-CAM, attention rollout, feature maps",
                                  description="For the same images, show where each run's model looks (Grad-CAM at the last "
                                  "stage for CNNs, attention rollout for ViTs), side by side; plus each CNN's feature maps.")
    explain.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    explain.add_argument("--files", nargs="+", default=[], metavar="IMAGE", help="image files (default: the first --images test images)")
    add_inspection_flags(explain)

    predict = commands.add_parser("predict", help="top-k classes for image files",
                                  description="Resize each image to 32x32 and print its top-k classes with probabilities.")
    predict.add_argument("run_dir", metavar="RUN_DIR")
    predict.add_argument("files", nargs="+", metavar="IMAGE")
    predict.add_argument("--top", type=int, default=3, help="classes to show per image (default 3)")

    export = commands.add_parser("export", help="export a trained run's model (ONNX)",
                                 description="Write the run's model as ONNX (input: float32 images in [0, 1], normalised in "
                                 "the graph; output: logits) and check it with onnxruntime against PyTorch on test images.")
    export.add_argument("run_dir", metavar="RUN_DIR")
    export.add_argument("--onnx", required=True, metavar="FILE", help="the .onnx file to write")
    export.add_argument("--check-images", "--check_images", dest="check_images", type=int, default=1000,
                        help="test images to compare ONNX and PyTorch logits on (0: skip the check; default 1000)")
    export.add_argument("--data-dir", "--data_dir", dest="data_dir", help="folder holding CIFAR-10 (for the check)")

    gif = commands.add_parser("gif", help="(re)build a run's training GIF from its per-epoch snapshots",
                              description="Render RUN_DIR/training.gif (one frame per epoch) from the snapshots a run "
                              "trained with --gif true saved.")
    gif.add_argument("run_dir", metavar="RUN_DIR")
    gif.add_argument("--out", help="GIF file to write (default RUN_DIR/training.gif)")

    commands.add_parser("models", help="list models and presets with parameter counts")
    return parser


NOT_CONFIG = ("command", "model", "preset", "out", "resume", "specs", "vary", "seeds", "budget", "jobs", "study_dir", "html", "command_line")


def run_config_from_args(args: argparse.Namespace) -> RunConfig:
    """Preset values, then the flags given on the command line; everything else keeps its default."""
    given = {key: value for key, value in vars(args).items() if value is not None and key not in NOT_CONFIG}
    return build_run_config(args.model, args.preset, given)


def command_train(args: argparse.Namespace) -> None:
    from vitlab.distributed import shutdown
    from vitlab.training import resume_run, train_run

    try:
        if args.resume:
            given = sorted(key for key, value in vars(args).items() if value is not None and key not in ("command", "resume", "command_line"))
            if given:
                raise VitlabError(f"--resume continues a run with its saved settings; drop --{given[0]}")
            results = resume_run(args.resume)
        else:
            results = train_run(run_config_from_args(args), args.out)
    finally:
        shutdown()
    if "rank" in results:  # a data-parallel process other than rank 0: rank 0 reports
        return
    print(f"test accuracy {results['test_acc']:.2f}% (test loss {results['test_loss']:.4f}, "
          f"best validation {results['best_val_acc']:.2f}%), {results['train_seconds']:.0f} s of training "
          f"at {results['images_per_second']:.0f} img/s; results in {results['out_dir']}")


def study_plan_from_args(args: argparse.Namespace, specs: list[str], kind: str, vary: str | None = None):
    from vitlab.study import BUDGETS, StudyPlan, parse_spec

    if args.seeds < 1:
        raise VitlabError(f"--seeds must be >= 1, got {args.seeds}")
    given = {key: value for key, value in vars(args).items() if value is not None and key not in NOT_CONFIG}
    budget = dict(BUDGETS[args.budget]) if args.budget else {}
    budget.update(given)
    first_seed = budget.pop("seed", 0)
    for spec in specs:
        parse_spec(spec)
    if len(set(specs)) != len(specs):
        raise VitlabError(f"a SPEC is given twice ({' '.join(specs)}); each model must appear once")
    return StudyPlan(specs=list(specs), budget=budget, seeds=[first_seed + i for i in range(args.seeds)], kind=kind, vary=vary)


def finish_study(args: argparse.Namespace, plan) -> None:
    from vitlab.study import run_study
    from vitlab.summary import summarize_study

    run_study(plan, args.out, jobs=args.jobs, command=args.command_line)
    summary = summarize_study(args.out)
    print(summary.markdown_table())
    print(f"tables and figures in {args.out}; write a report with: vitlab report {args.out}")


def command_compare(args: argparse.Namespace) -> None:
    from vitlab.study import SEED_STUDY

    finish_study(args, study_plan_from_args(args, list(args.specs or SEED_STUDY), "compare"))


def command_sweep(args: argparse.Namespace) -> None:
    from vitlab.study import sweep_specs

    base = args.preset or args.model or "vit"
    if args.preset and args.model:
        raise VitlabError("give --model or --preset, not both")
    field_name = args.vary.partition("=")[0].strip()
    if getattr(args, field_name, None) is not None:
        raise VitlabError(f"--{field_name} is what --vary changes; drop one of them")
    plan = study_plan_from_args(args, sweep_specs(base, args.vary), "sweep", vary=field_name)
    finish_study(args, plan)


def command_report(args: argparse.Namespace) -> None:
    from vitlab.report import write_report

    for path in write_report(args.study_dir, html=args.html):
        print(f"wrote {path}")


def command_export(args: argparse.Namespace) -> None:
    from vitlab.data import load_cifar10_test
    from vitlab.export import check_onnx, export_onnx
    from vitlab.models import VitlabModel

    model = VitlabModel.load(args.run_dir)
    path = export_onnx(model, args.onnx)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    if args.check_images > 0:
        check = check_onnx(path, model, load_cifar10_test(args.data_dir, args.check_images)[0])
        print(f"onnxruntime vs PyTorch on {check.images} test images: top-1 agreement {100 * check.top1_agreement:.2f}%, "
              f"largest logit difference {check.max_abs_logit_difference:.2e}")


def command_gif(args: argparse.Namespace) -> None:
    from vitlab.gif import write_training_gif

    print(f"wrote {write_training_gif(args.run_dir, args.out)}")


def command_evaluate(args: argparse.Namespace) -> None:
    from vitlab.training import evaluate_run

    figures = None if args.figures is None else (args.figures or str(Path(args.run_dir) / "figures"))
    print(json.dumps(evaluate_run(args.run_dir, args.data_dir, args.device, figures_dir=figures), indent=2))


def inspection_images(args: argparse.Namespace, files: list[str]):
    """The images to look at: the given files (unreadable ones reported and skipped) or test images."""
    from vitlab.images import load_image_files, test_images

    if not files:
        if args.images < 1:
            raise VitlabError(f"--images must be >= 1, got {args.images}")
        return test_images(args.images, args.data_dir)
    images, errors = load_image_files(files)
    for error in errors:
        print(f"vitlab {args.command}: error: {error}", file=sys.stderr)
    if not len(images.images):
        raise VitlabError("none of the given files is a readable image")
    return images


def command_attention(args: argparse.Namespace) -> None:
    from vitlab.images import ImageSet
    from vitlab.models import VisionTransformer
    from vitlab.visualize import attention_distance_plot, attention_grid

    model = VisionTransformer.load(args.run_dir)
    layers = None
    if args.layer != "all":
        if not args.layer.isdigit() or not 1 <= int(args.layer) <= model.config.num_blocks:
            raise VitlabError(f"--layer must be all or a layer number 1..{model.config.num_blocks}, got '{args.layer}'")
        layers = [int(args.layer)]
    # Attention distance is averaged over at least 256 test images; the grids show the first --images of them.
    statistics = inspection_images(args, args.files) if args.files else inspection_images(
        argparse.Namespace(**{**vars(args), "images": max(256, args.images)}), [])
    images = statistics if args.files else ImageSet(statistics.images[:args.images], statistics.labels[:args.images],
                                                    statistics.names[:args.images])
    out = Path(args.out or Path(args.run_dir) / "figures")
    written = attention_grid(model, images, out, method=args.method, head=args.head, layers=layers)
    written.append(attention_distance_plot(model, statistics.images, out / "attention_distance.png"))
    for path in written:
        print(f"wrote {path}")


def command_explain(args: argparse.Namespace) -> None:
    from vitlab.cnn_maps import model_stages
    from vitlab.models import VisionTransformer, VitlabModel
    from vitlab.visualize import explain_figure, feature_map_figure

    models = [(Path(run_dir).name, VitlabModel.load(run_dir)) for run_dir in args.run_dirs]
    for _, model in models:
        if not isinstance(model, VisionTransformer):
            model_stages(model)  # an MLP has nothing to show: say so before any work
    images = inspection_images(args, args.files)
    out = Path(args.out or Path(args.run_dirs[0]) / "figures")
    written = [explain_figure(models, images, out / "explain.png")]
    written += [feature_map_figure(model, images.images[0], out / f"feature_maps_{name}.png")
                for name, model in models if not isinstance(model, VisionTransformer)]
    for path in written:
        print(f"wrote {path}")


def command_predict(args: argparse.Namespace) -> int:
    import torch

    from vitlab.data import CLASSES, normalize
    from vitlab.images import load_image_file
    from vitlab.models import VitlabModel

    if not 1 <= args.top <= len(CLASSES):
        raise VitlabError(f"--top must be between 1 and {len(CLASSES)}, got {args.top}")
    model = VitlabModel.load(args.run_dir).eval()
    failed = 0
    for path in args.files:
        try:
            image = load_image_file(path)
        except ValueError as error:
            print(f"vitlab predict: error: {error}", file=sys.stderr)
            failed += 1
            continue
        with torch.inference_mode():
            probabilities = model(normalize(image[None]))[0].float().softmax(dim=0)
        top = probabilities.topk(args.top)
        print(f"{path}: " + ", ".join(f"{CLASSES[i]} {100 * p:.1f}%" for p, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)))
    return 2 if failed else 0


def command_models(args: argparse.Namespace) -> None:
    print(f"{'model':<14}{'parameters':>12}  default config")
    for name in MODELS:
        model = build_model(name)
        print(f"{name:<14}{model.num_parameters:>12,}  {json.dumps(dataclasses.asdict(model.config))}")
    print(f"\n{'preset':<14}{'parameters':>12}  recipe")
    for name, preset in PRESETS.items():
        model = build_model(preset.model, **preset.model_config)
        print(f"{name:<14}{model.num_parameters:>12,}  {preset.description}; train {json.dumps(preset.train)}")


COMMANDS = {"train": command_train, "evaluate": command_evaluate, "models": command_models,
            "compare": command_compare, "export": command_export, "gif": command_gif,
            "attention": command_attention, "explain": command_explain, "predict": command_predict, "sweep": command_sweep, "report": command_report}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.command_line = shlex.join(["vitlab", *argv])
    if args.command is None:
        parser.print_help()
        return 2
    try:
        status = COMMANDS[args.command](args)
    except VitlabError as error:
        print(f"vitlab {args.command}: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print(f"vitlab {args.command}: interrupted", file=sys.stderr)
        return 130
    except OSError as error:  # a full disk, a vanished folder, ... (files are written atomically: nothing half-written)
        where = f" ({error.filename})" if error.filename else ""
        hint = "; free some space or choose another folder" + (", then continue with: vitlab train --resume RUN_DIR" if args.command == "train" else "")
        print(f"vitlab {args.command}: error: {error.strerror or error}{where}{hint}", file=sys.stderr)
        return 1
    return status or 0
