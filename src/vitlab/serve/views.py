"""What the page shows for one run and one image, as plain functions of tensors (no gradio, no browser).

Images come in as (3, 32, 32) uint8 and go out as (H, W, 3) uint8 arrays, enlarged so a 32-pixel
image is visible on a page. The maps themselves are the `vitlab explain` / `vitlab attention` ones
(`vitlab.inspect.explain.explanation_maps`, `layer_maps`): one computation, shown in two places.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from vitlab.errors import VitlabError
from vitlab.inspect.explain import METHOD_LABELS, ExplainSettings, explanation_maps
from vitlab.inspect.figures import confusion_figure, layer_maps, model_inputs, vit_attention
from vitlab.models.base import eval_mode
from vitlab.serve.runs import ServedRun

DISPLAY_SCALE = 6  # a 32-pixel image is shown 192 pixels wide
TOP_CLASSES = 5


def enlarge(image: torch.Tensor, scale: int = DISPLAY_SCALE) -> np.ndarray:
    """(3, H, W) uint8 → (H·scale, W·scale, 3) uint8, nearest-neighbour so the pixels stay visible."""
    big = image.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)  # (3, H·s, W·s)
    return big.permute(1, 2, 0).contiguous().numpy()


def heat_overlay(image: torch.Tensor, heat: torch.Tensor, scale: int = DISPLAY_SCALE, alpha: float = 0.5) -> np.ndarray:
    """A map (H, W) over its image (3, H, W) uint8, as (H·scale, W·scale, 3) uint8 with the jet colour map.

    Each map is stretched to its own range, as in the `vitlab explain` figures: the pattern, not the level."""
    from matplotlib import colormaps

    heat = heat.detach().float().cpu()
    heat = (heat - heat.min()) / (heat.max() - heat.min()).clamp_min(1e-12)
    side = (image.shape[1] * scale, image.shape[2] * scale)
    heat = F.interpolate(heat[None, None], size=side, mode="bilinear", align_corners=False)[0, 0].clamp(0, 1)  # (H·s, W·s)
    colours = colormaps["jet"](heat.numpy())[..., :3]  # (H·s, W·s, 3) in [0, 1]
    blended = (1 - alpha) * enlarge(image, scale) / 255.0 + alpha * colours
    return np.clip(np.rint(blended * 255), 0, 255).astype(np.uint8)


def top_classes(run: ServedRun, image: torch.Tensor, count: int = TOP_CLASSES) -> dict[str, float]:
    """The run's `count` most probable classes for a (3, 32, 32) uint8 image, most probable first."""
    with run.lock, torch.inference_mode():
        probabilities = run.model(run.model.input_spec.normalize(image[None]))[0].float().softmax(dim=0)  # (classes,)
    best = probabilities.topk(min(count, len(probabilities)))
    return {run.classes[index]: float(value) for value, index in zip(best.values.tolist(), best.indices.tolist(), strict=True)}


def where_it_looks(run: ServedRun, image: torch.Tensor) -> tuple[np.ndarray | None, str]:
    """Grad-CAM (CNN, for the predicted class) or the attention rollout (ViT) over the image, and a caption.
    None and the reason for a model that has neither."""
    if run.kind == "other":
        return None, f"a '{run.model.name}' model has neither attention nor convolutional stages: predictions only"
    method = "rollout" if run.kind == "vit" else "gradcam"
    with run.lock:
        inputs = model_inputs(run.model, image[None])
        with eval_mode(run.model), torch.no_grad():
            probabilities = run.model(inputs).float().softmax(dim=1)
        maps, _ = explanation_maps(run.model, inputs, method, probabilities.argmax(dim=1), ExplainSettings())
        method = METHOD_LABELS[method]
    predicted = run.classes[int(probabilities[0].argmax())]
    if run.kind == "vit":
        caption = f"{method} through all {run.model.config.num_blocks} layers (prediction: {predicted})"
    else:
        caption = f"{method} at the last stage, for the predicted class '{predicted}'"
    return heat_overlay(image, maps[0]), caption


def attention_overlay(run: ServedRun, image: torch.Tensor, layer: int, head: int) -> tuple[np.ndarray, str]:
    """One ViT layer's attention over the image, for one head (1-based) or the mean of the heads (head 0), and a caption."""
    if run.kind != "vit":
        raise VitlabError(f"{run.name} is a '{run.model.name}' model, which has no attention; per-layer attention is for ViT runs")
    layers, heads = run.model.config.num_blocks, run.model.config.num_heads
    if not 1 <= layer <= layers or not 0 <= head <= heads:
        raise VitlabError(f"{run.name} has layers 1..{layers} and heads 1..{heads} (0 for their mean), got layer {layer} head {head}")
    with run.lock:
        _, attention = vit_attention(run.model, image[None])  # (L, 1, heads, T, T)
    maps = layer_maps(run.model, attention, "raw", "mean" if head == 0 else str(head), image.shape[-1])  # (L, 1, 1, H, W)
    what = "CLS-to-patch attention" if run.model.config.pool == "cls" else "attention received by each patch"
    which = f"mean of {heads} heads" if head == 0 else f"head {head} of {heads}"
    return heat_overlay(image, maps[layer - 1, 0, 0]), f"layer {layer} of {layers}, {which}: {what}"


def rendered(draw: Callable[[Path], object]) -> np.ndarray:
    """A figure that `draw(path)` writes as PNG, as an (H, W, 3) uint8 array (nothing is left on disk)."""
    with tempfile.TemporaryDirectory(prefix="vitlab-serve-") as folder:
        path = Path(folder) / "figure.png"
        draw(path)
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB")).copy()


def confusion_image(run: ServedRun) -> tuple[np.ndarray | None, str]:
    """The confusion matrix of the run's saved test predictions, and a caption (or None and why not)."""
    try:
        tensors = run.folder.predictions()
    except VitlabError as error:
        return None, f"no confusion matrix: {error}"
    labels, predictions = tensors["labels"].long(), tensors["predictions"].long()
    right = 100 * float((labels == predictions).float().mean()) if len(labels) else 0.0
    title = f"{run.name}: confusion matrix (% of each true class)"
    image = rendered(lambda path: confusion_figure(predictions, labels, path, title=title))
    return image, f"{len(labels):,} test images, {right:.2f}% right"


def curves_image(run: ServedRun) -> tuple[np.ndarray | None, str]:
    """The run's curves.png, redrawn from metrics.jsonl when it is missing or unreadable; or None and why not."""
    from vitlab.inspect.curves import plot_curves

    if run.folder.curves_file.is_file():
        try:
            with Image.open(run.folder.curves_file) as image:
                return np.asarray(image.convert("RGB")).copy(), f"{run.folder.curves_file.name} from the run folder"
        except (OSError, ValueError):
            pass  # damaged: redraw it below
    try:
        history = run.folder.history()
    except VitlabError as error:
        return None, f"no training curves: {error}"
    if not history:
        return None, f"no training curves: {run.folder.path} has neither a readable curves.png nor a history (metrics.jsonl)"
    epochs = f"{len(history)} epoch{'s' * (len(history) != 1)}"
    return rendered(lambda path: plot_curves(history, path, title=run.name)), f"redrawn from {run.folder.metrics_file.name} ({epochs})"
