"""`vitlab serve`: a local web app to look at trained runs (needs the `serve` extra: gradio)."""

from __future__ import annotations

import argparse

from vitlab.cli.parser import add_data_dir_flag


def port_number(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got '{text}'") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be between 1 and 65535, got {value}")
    return value


def add_parser(commands) -> None:
    serve = commands.add_parser("serve", help="a local web app: predictions, Grad-CAM and attention of runs, side by side",
                                description="Serve a web page on which you pick a CIFAR-10 test image (or upload one) and see each "
                                "run's top-5 classes side by side, Grad-CAM for CNN runs, attention rollout and per-layer, per-head "
                                "attention for ViT runs, and each run's confusion matrix and training curves. Needs gradio: "
                                "pip install 'vitlab[serve]'.")
    serve.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="finished run folders written by 'vitlab train'")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 opens it to the network)")
    serve.add_argument("--port", type=port_number, default=7860, help="port to listen on (default 7860)")
    add_data_dir_flag(serve)


def run(args: argparse.Namespace) -> None:
    from vitlab.inspect.images import test_images
    from vitlab.serve.app import build_app, check_address, require_gradio, serve
    from vitlab.serve.runs import load_runs

    check_address(args.host, args.port)
    runs = load_runs(args.run_dirs)  # bad folders are refused before anything starts
    images = test_images(10_000, args.data_dir)  # the whole test set (fewer if it is smaller)
    require_gradio()
    print(f"vitlab serve: {len(runs)} run{'s' * (len(runs) > 1)}, {len(images.images):,} test images; starting the server", flush=True)
    serve(build_app(runs, images), args.host, args.port, announce=lambda line: print(f"vitlab serve: {line}", flush=True))
