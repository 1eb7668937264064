"""The page of `vitlab serve`: the Gradio layout and its events, nothing else (the work is in views.py).

    [ gallery of test images | index slider | upload ]   [ the 32×32 image the models see, its source ]
    [ run 1: top-5, Grad-CAM or rollout, layer/head attention ] [ run 2: ... ] ...
    [ run 1: confusion matrix, training curves ] [ run 2: ... ] ...

Elements carry `elem_id`s (status, top5-0, map-0, attention-0, ...) so a browser test can find them.
"""

# No `from __future__ import annotations`: gradio reads the real `gr.SelectData` annotation of pick_gallery.
import inspect
import math
from collections.abc import Callable
from typing import Any

import torch

from vitlab.errors import VitlabError
from vitlab.inspect.images import ImageSet
from vitlab.serve import views
from vitlab.serve.runs import IMAGE_SIZE, ServedRun
from vitlab.serve.uploads import MAX_UPLOAD_BYTES, read_upload

GALLERY_IMAGES = 40
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def require_gradio():
    """The gradio module, or a one-line error saying how to install it."""
    try:
        import gradio
    except ImportError:
        raise VitlabError("vitlab serve needs gradio, which is not installed; install it with: pip install 'vitlab[serve]'") from None
    return gradio


def whole_number(value: Any, low: int, high: int) -> int:
    """A slider's or a click's value as an int within [low, high]: the browser can send NaN, a string or a list, which
    the sliders' own bounds do not stop (NaN compares false with both ends); anything that is not a number is `low`."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return low
    return low if not math.isfinite(number) else min(max(int(number), low), high)


def build_app(runs: list[ServedRun], images: ImageSet):
    """The Gradio Blocks app for `runs`, with `images` (CIFAR-10 test images) to pick from."""
    gr = require_gradio()
    count = len(images.images)
    if not count:
        raise VitlabError("no test images to show; check that CIFAR-10's test_batch is complete")

    def picked(image: torch.Tensor, source: str) -> tuple[torch.Tensor, Any, str]:
        return image, views.enlarge(image), source

    def pick_test(index: float) -> tuple[torch.Tensor, Any, str]:
        index = whole_number(index, 0, count - 1)
        return picked(images.images[index], f"**test image {index}**, true class: **{images.true_name(index)}**")

    def pick_gallery(event: gr.SelectData) -> tuple[torch.Tensor, Any, str, int]:
        index = whole_number(event.index, 0, count - 1)
        return (*pick_test(index), index)

    def pick_upload(path: str, current: torch.Tensor | None) -> tuple[Any, Any, str]:
        try:
            if not isinstance(path, str) or not path:
                raise VitlabError("no file arrived; upload an image file again")
            image = read_upload(path)
        except VitlabError as error:
            return current, gr.update(), f"**Refused:** {error}"
        name = str(path).replace("\\", "/").rsplit("/", 1)[-1]
        return picked(image, f"**uploaded {name}**, resized to {IMAGE_SIZE}×{IMAGE_SIZE}")

    gallery_items = [(views.enlarge(images.images[i], 2), f"{i}: {images.true_name(i)}") for i in range(min(GALLERY_IMAGES, count))]
    with gr.Blocks(title="vitlab serve", analytics_enabled=False) as app:
        gr.Markdown("## vitlab serve\nPick a CIFAR-10 test image or upload one; each run's prediction and where it looks "
                    "are shown side by side.\n\n" + "\n".join(f"- {run.title()}" for run in runs))
        current = gr.State(None)
        with gr.Row():
            with gr.Column(scale=3):
                gallery = gr.Gallery(gallery_items, label=f"the first {len(gallery_items)} test images (click one)", columns=10,
                                     height=220, allow_preview=False, elem_id="gallery")
                index = gr.Slider(0, max(count - 1, 1), value=0, step=1, label=f"or any test image by number (0..{count - 1})", elem_id="test-index")
                upload = gr.UploadButton(f"or upload an image (PNG, JPEG, ...; at most {MAX_UPLOAD_BYTES // 2**20} MB)", size="md",
                                          elem_id="upload")
            with gr.Column(scale=1):
                preview = gr.Image(label=f"the image the models see ({IMAGE_SIZE}×{IMAGE_SIZE})", interactive=False, format="png", elem_id="preview")
                status = gr.Markdown(elem_id="status")
        outputs, sliders = [], []
        with gr.Row(equal_height=False):
            for number, run in enumerate(runs):
                run_outputs, run_sliders = add_run_column(gr, run, number, current)
                outputs += run_outputs
                sliders += run_sliders
        add_training_figures(gr, runs)
        producers = [run_view(run) for run in runs]

        def show(image: torch.Tensor | None, *slider_values: float) -> list[Any]:
            values, positions = [], iter(slider_values)
            for run, produce in zip(runs, producers, strict=True):
                layer_and_head = (next(positions), next(positions)) if run.kind == "vit" else ()
                values += produce(image, *layer_and_head)
            return values

        chosen = [current, preview, status]
        app.load(pick_test, [index], chosen).then(show, [current, *sliders], outputs)
        # `input` fires for the user's dragging and typing, not when a gallery click sets the number
        index.input(pick_test, [index], chosen, trigger_mode="always_last").then(show, [current, *sliders], outputs)
        gallery.select(pick_gallery, None, [*chosen, index]).then(show, [current, *sliders], outputs)
        upload.upload(pick_upload, [upload, current], chosen).then(show, [current, *sliders], outputs)
    return app


def add_run_column(gr, run: ServedRun, number: int, current) -> tuple[list[Any], list[Any]]:
    """One run's column: its top-5, its map and caption, and for a ViT the layer and head sliders with that
    layer's attention. Returns the outputs `run_view(run)` fills, and the sliders it reads."""
    with gr.Column(elem_id=f"run-{number}"):
        gr.Markdown(f"### {run.name}\n{run.model.name}, test accuracy {run.test_acc:.2f}%")
        map_label = {"cnn": "Grad-CAM", "vit": "attention rollout"}.get(run.kind, "no map")
        outputs = [gr.Label(num_top_classes=views.TOP_CLASSES, label="top-5 classes", elem_id=f"top5-{number}"),
                   gr.Image(label=map_label, interactive=False, format="png", elem_id=f"map-{number}"),
                   gr.Markdown(elem_id=f"map-caption-{number}")]
        if run.kind != "vit":
            return outputs, []
        config = run.model.config
        if config.num_blocks > 1:
            layer = gr.Slider(1, config.num_blocks, value=config.num_blocks, step=1, label="layer", elem_id=f"layer-{number}")
        else:  # a slider needs two ends
            layer = gr.Number(1, label="layer (the model has one)", interactive=False, elem_id=f"layer-{number}")
        head = gr.Slider(0, config.num_heads, value=0, step=1, label="head (0: mean of the heads)", elem_id=f"head-{number}")
        attention = gr.Image(label="attention of one layer", interactive=False, format="png", elem_id=f"attention-{number}")
        caption = gr.Markdown(elem_id=f"attention-caption-{number}")
        # One listener for both sliders: its events run one at a time in the order they came, so a change of the layer
        # cannot finish after a later change of the head and leave the earlier pair on screen (two listeners did).
        gr.on([layer.change, head.change], attention_view(run), [current, layer, head], [attention, caption],
              trigger_mode="always_last", concurrency_limit=1)
        return [*outputs, attention, caption], [layer, head]


def add_training_figures(gr, runs: list[ServedRun]) -> None:
    """Each run's confusion matrix and training curves, drawn once when the app is built."""
    with gr.Accordion("how each run trained: confusion matrix on the test set and training curves", open=True):
        with gr.Row(equal_height=False):
            for number, run in enumerate(runs):
                with gr.Column():
                    for kind, (figure, caption) in (("confusion", views.confusion_image(run)), ("curves", views.curves_image(run))):
                        if figure is not None:  # the figures carry their own titles
                            gr.Image(figure, show_label=False, interactive=False, format="png", elem_id=f"{kind}-{number}")
                        gr.Markdown(caption, elem_id=f"{kind}-caption-{number}")


def run_view(run: ServedRun) -> Callable[..., list[Any]]:
    """image (, layer, head) → this run's outputs: top-5, its map (None for a model without one) and caption, then
    (ViT) one layer's attention and caption."""

    def produce(image: torch.Tensor | None, *layer_and_head: float) -> list[Any]:
        if image is None:
            return [None, None, ""] + [None, ""] * (run.kind == "vit")
        values: list[Any] = [views.top_classes(run, image), *views.where_it_looks(run, image)]
        if run.kind == "vit":
            values += list(views.attention_overlay(run, image, *layer_and_head_of(run, *layer_and_head)))
        return values

    return produce


def attention_view(run: ServedRun) -> Callable[[torch.Tensor | None, float, float], tuple[Any, str]]:
    def one_layer(image: torch.Tensor | None, layer: float, head: float) -> tuple[Any, str]:
        if image is None:
            return None, ""
        return views.attention_overlay(run, image, *layer_and_head_of(run, layer, head))

    return one_layer


def layer_and_head_of(run: ServedRun, layer: Any, head: Any) -> tuple[int, int]:
    """The sliders' values as a valid (layer 1..blocks, head 0..heads; head 0 is the mean of the heads)."""
    return whole_number(layer, 1, run.model.config.num_blocks), whole_number(head, 0, run.model.config.num_heads)


def check_address(host: str, port: int) -> None:
    """Refuse, before anything starts, a host this machine cannot listen on (the server's own failure prints a log line
    of its own beside vitlab's error)."""
    import socket

    try:
        family, kind, protocol, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError):
        raise VitlabError(f"--host {host} is not an address or a name this machine can resolve; use 127.0.0.1, 0.0.0.0 or one "
                          "of this machine's addresses") from None
    with socket.socket(family, kind, protocol) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as error:
            raise VitlabError(f"cannot listen on {host}:{port} ({error.strerror or error}); choose another --port, or a --host "
                              "that is this machine's") from None


def serve(app, host: str, port: int, announce: Callable[[str], None] = print) -> None:
    """Start the server on host:port and block until Ctrl-C. Uploads over the limit are refused by the server."""
    options = {"server_name": host, "server_port": port, "max_file_size": MAX_UPLOAD_BYTES, "share": False, "quiet": True,
               "show_error": True, "prevent_thread_lock": True, "ssr_mode": False, "mcp_server": False, "footer_links": []}
    accepted = inspect.signature(app.launch).parameters  # older gradio releases lack some of these options
    try:
        app.launch(**{name: value for name, value in options.items() if name in accepted})
    except OSError:
        raise VitlabError(f"cannot listen on {host}:{port} (the port is taken or the address is not this machine's); "
                          "choose another --port or --host") from None
    announce(f"serving at {app.local_url} (Ctrl-C to stop)")
    if host not in LOOPBACK:
        announce(f"note: --host {host} lets anyone who can reach this machine use the app and upload images")
    app.block_thread()
