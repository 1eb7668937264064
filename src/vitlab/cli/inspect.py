"""`vitlab evaluate`, `attention`, `explain`, `predict`, `export` and `gif`: looking at trained runs."""

from __future__ import annotations

import argparse
import json
import sys

from vitlab.cli.parser import add_data_dir_flag, non_negative_int, positive_int
from vitlab.inspect.attention import HEAD_FUSIONS
from vitlab.inspect.explain import AUTO, METHODS


def add_device_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto", help="where the model runs (default: a GPU if there is one)")


def add_image_flags(parser: argparse.ArgumentParser) -> None:
    add_device_flag(parser)
    parser.add_argument("--images", type=positive_int, default=4, help="how many test images to show when no files are given (default 4)")
    parser.add_argument("--out", help="folder for the figures (default RUN_DIR/figures)")
    add_data_dir_flag(parser)


def add_parser(commands) -> None:
    evaluate = commands.add_parser("evaluate", help="test a saved run and print JSON")
    evaluate.add_argument("run_dir", metavar="RUN_DIR")
    add_data_dir_flag(evaluate)
    evaluate.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], help="device to evaluate on")
    evaluate.add_argument("--figures", nargs="?", const="", metavar="DIR",
                          help="also write confusion matrix, per-class accuracy and most confident mistakes (default DIR: RUN_DIR/figures)")

    attention = commands.add_parser("attention", help="ViT attention maps per layer and head, rollout, attention distance",
                                    description="Write one PNG per image: the image, each layer's attention (CLS-to-patch, or "
                                    "attention received per patch for mean pooling), and the attention rollout, with predicted "
                                    "and true class; plus attention_distance.png (mean attention distance per layer and head).")
    attention.add_argument("run_dir", metavar="RUN_DIR", help="a ViT run folder")
    attention.add_argument("files", nargs="*", metavar="IMAGE", help="image files (default: the first --images test images)")
    add_image_flags(attention)
    attention.add_argument("--layer", default="all", help="layer number (1-based) or all (default)")
    attention.add_argument("--head", default="mean", help="head number (1-based), mean (default) or all")
    attention.add_argument("--method", default="raw", choices=["raw", "rollout"],
                           help="what each layer panel shows: its own attention (raw) or the rollout up to it")

    explain = commands.add_parser("explain", help="CNNs and ViTs side by side: CAMs, attention rollout, faithfulness ranking",
                                  description="For the same images, show where each run's model looks by each method (CAMs from "
                                  "pytorch-grad-cam on CNNs and ViTs, attention rollout on ViTs), side by side in explain.png; rank "
                                  "every (run, method) by deletion / insertion AUC (Petsiuk et al. 2018) in explain_scores.md and "
                                  ".json; plus each CNN's feature maps. The CAMs need pip install 'vitlab[explain]'.")
    explain.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    explain.add_argument("--files", nargs="+", default=[], metavar="IMAGE", help="image files (default: the first --images test images)")
    add_image_flags(explain)
    explain.add_argument("--methods", type=method_list, default=(AUTO,), metavar="M1,M2,...",
                         help=f"comma-separated methods: {', '.join(METHODS)}; {AUTO} (default): gradcam for CNNs, rollout for ViTs. "
                         "Each runs on every run it applies to")
    explain.add_argument("--head-fusion", "--head_fusion", dest="head_fusion", choices=list(HEAD_FUSIONS), default="mean",
                         help="how rollout fuses a layer's heads (default mean)")
    explain.add_argument("--discard-ratio", "--discard_ratio", dest="discard_ratio", type=float, default=0.0,
                         help="share of each layer's weakest attention entries rollout drops, in [0, 1) (default 0)")
    explain.add_argument("--score-images", "--score_images", dest="score_images", type=positive_int,
                         help="test images the faithfulness ranking averages over (default: the shown --images; ignored with --files)")
    explain.add_argument("--steps", type=positive_int, default=32, help="pixel steps of the deletion and insertion curves (default 32)")

    predict = commands.add_parser("predict", help="top-k classes for image files",
                                  description="Resize each image to the run's image size and print its top-k classes with probabilities.")
    predict.add_argument("run_dir", metavar="RUN_DIR")
    predict.add_argument("files", nargs="+", metavar="IMAGE")
    predict.add_argument("--top", type=positive_int, default=3, help="classes to show per image (default 3)")
    add_device_flag(predict)

    export = commands.add_parser("export", help="export a trained run's model (ONNX)",
                                 description="Write the run's model as ONNX (input: float32 images in [0, 1], normalised in "
                                 "the graph; output: logits) and check it with onnxruntime against PyTorch on test images.")
    export.add_argument("run_dir", metavar="RUN_DIR")
    export.add_argument("--onnx", required=True, metavar="FILE", help="the .onnx file to write")
    export.add_argument("--check-images", "--check_images", dest="check_images", type=non_negative_int, default=1000,
                        help="test images to compare ONNX and PyTorch logits on (0: skip the check; default 1000)")
    add_data_dir_flag(export)

    gif = commands.add_parser("gif", help="(re)build a run's training GIF from its per-epoch snapshots",
                              description="Render RUN_DIR/training.gif (one frame per epoch) from the snapshots a run "
                              "trained with --gif true saved.")
    gif.add_argument("run_dir", metavar="RUN_DIR")
    gif.add_argument("--out", help="GIF file to write, ending in .gif (default RUN_DIR/training.gif)")


def method_list(text: str) -> tuple[str, ...]:
    """'gradcam,rollout' → ('gradcam', 'rollout'), each a known method (argparse's `type=`)."""
    methods = tuple(part.strip().lower() for part in text.split(",") if part.strip())
    unknown = [method for method in methods if method not in (*METHODS, AUTO)]
    if unknown or not methods:
        raise argparse.ArgumentTypeError(f"unknown method '{unknown[0] if unknown else text}'; choose from {', '.join(METHODS)} or {AUTO}")
    return methods


def print_errors(command: str, errors: list[str]) -> None:
    for error in errors:
        print(f"vitlab {command}: error: {error}", file=sys.stderr)


def run_evaluate(args: argparse.Namespace) -> None:
    from vitlab.rundir import RunDir
    from vitlab.train.run import evaluate_run

    figures = None if args.figures is None else (args.figures or str(RunDir(args.run_dir).figures))
    print(json.dumps(evaluate_run(args.run_dir, args.data_dir, args.device, figures_dir=figures), indent=2))


def run_attention(args: argparse.Namespace) -> int:
    from vitlab.inspect.reports import write_attention_figures

    errors: list[str] = []
    written = write_attention_figures(args.run_dir, args.files, args.images, args.out, args.layer, args.head, args.method,
                                      args.data_dir, errors, device=args.device)
    print_errors(args.command, errors)
    for path in written:
        print(f"wrote {path}")
    return 2 if errors else 0


def run_explain(args: argparse.Namespace) -> int:
    from vitlab.inspect.explain import ExplainSettings
    from vitlab.inspect.reports import write_explanations

    errors: list[str] = []
    settings = ExplainSettings(methods=args.methods, head_fusion=args.head_fusion, discard_ratio=args.discard_ratio, steps=args.steps)
    written = write_explanations(args.run_dirs, args.files, args.images, args.out, args.data_dir, errors, settings, args.score_images,
                                 device=args.device)
    print_errors(args.command, errors)
    for path in written:
        print(f"wrote {path}")
    return 2 if errors else 0


def run_predict(args: argparse.Namespace) -> int:
    from vitlab.inspect.reports import predict_files

    predictions, errors = predict_files(args.run_dir, args.files, args.top, device=args.device)
    print_errors(args.command, errors)
    for path, top in predictions:
        print(f"{path}: " + ", ".join(f"{name} {100 * p:.1f}%" for name, p in top))
    return 2 if errors else 0


def run_export(args: argparse.Namespace) -> None:
    from vitlab.inspect.export import check_onnx, export_onnx
    from vitlab.inspect.reports import images_to_show
    from vitlab.rundir import RunDir

    model = RunDir(args.run_dir).model()
    path = export_onnx(model, args.onnx)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    if args.check_images > 0:
        images = images_to_show([], args.check_images, args.data_dir, [], args.run_dir).images  # the run's own test set
        check = check_onnx(path, model, images)
        print(f"onnxruntime vs PyTorch on {check.images} test images: top-1 agreement {100 * check.top1_agreement:.2f}%, "
              f"largest logit difference {check.max_abs_logit_difference:.2e}")


def run_gif(args: argparse.Namespace) -> None:
    from vitlab.inspect.gif import write_training_gif

    print(f"wrote {write_training_gif(args.run_dir, args.out)}")
