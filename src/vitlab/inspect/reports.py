"""What `vitlab attention`, `explain` and `predict` produce, as library functions (the CLI only parses)."""

from __future__ import annotations

from pathlib import Path

import torch

from vitlab.errors import VitlabError
from vitlab.inspect.explain import ExplainSettings
from vitlab.inspect.images import ImageSet, load_image_file, load_image_files, test_images
from vitlab.io import atomic_write, write_json
from vitlab.rundir import RunDir

# Attention distance is averaged over at least this many test images (the figures show fewer).
DISTANCE_IMAGES = 256


def images_to_show(files: list[str], count: int, data_dir: str | None, errors: list[str], run_dir: str | Path | None = None,
                   size: int = 32) -> ImageSet:
    """The given image files (unreadable ones are added to `errors` and skipped; resized to `size`), or the first
    `count` test images of the dataset the run in `run_dir` was trained on."""
    if not files:
        data_config = RunDir(run_dir).config().data if run_dir is not None and RunDir(run_dir).config_file.is_file() else None
        return test_images(count, data_dir, data_config=data_config)
    images, file_errors = load_image_files(files, size=size)
    errors += file_errors
    if not len(images.images):
        raise VitlabError("none of the given files is a readable image" + (f" ({file_errors[0]})" if file_errors else ""))
    return images


def inspection_device(name: str = "auto"):
    from vitlab.train.device import pick_device

    return pick_device(name)


def write_attention_figures(run_dir: str | Path, files: list[str], count: int, out: str | Path | None = None, layer: str = "all",
                            head: str = "mean", method: str = "raw", data_dir: str | None = None, errors: list[str] | None = None,
                            device: str = "auto") -> list[Path]:
    """Per image: each layer's attention and the rollout; plus the mean attention distance per layer and head."""
    from vitlab.inspect.attention import require_attention
    from vitlab.inspect.figures import attention_distance_plot, attention_grid

    model = RunDir(run_dir).model(inspection_device(device))
    layout = require_attention(model)
    layers = None
    if layer != "all":
        if not layer.isascii() or not layer.isdigit() or not 1 <= int(layer) <= layout.num_layers:
            raise VitlabError(f"--layer must be all or a layer number 1..{layout.num_layers}, got '{layer}'")
        layers = [int(layer)]
    if head not in ("mean", "all") and not (head.isascii() and head.isdigit() and 1 <= int(head) <= layout.num_heads):
        raise VitlabError(f"--head must be mean, all or a head number 1..{layout.num_heads}, got '{head}'")
    errors = errors if errors is not None else []
    size = getattr(model.config, "image_size", 32)
    statistics = images_to_show(files, max(DISTANCE_IMAGES, count), data_dir, errors, run_dir, size=size)
    shown = first_images(statistics, count, files)
    out = Path(out) if out else RunDir(run_dir).figures
    written = attention_grid(model, shown, out, method=method, head=head, layers=layers)
    written.append(attention_distance_plot(model, statistics.images, out / "attention_distance.png"))
    return written


def first_images(images: ImageSet, count: int, files: list[str]) -> ImageSet:
    """The images to draw: all given files, or the first `count` test images."""
    return images if files else ImageSet(images.images[:count], images.labels[:count], images.names[:count], images.classes)


def write_explanations(run_dirs: list[str], files: list[str], count: int, out: str | Path | None = None, data_dir: str | None = None,
                       errors: list[str] | None = None, settings: ExplainSettings | None = None, score_images: int | None = None,
                       device: str = "auto") -> list[Path]:
    """Where each run's model looks on the same images, by each method, side by side (explain.png); the methods ranked
    by deletion / insertion AUC on `score_images` test images (default: the shown ones) (explain_scores.md and .json);
    and each CNN's feature maps."""
    from vitlab.inspect.explain import explain_runs, ranking_json, ranking_markdown
    from vitlab.inspect.figures import explain_figure, feature_map_figure

    settings = settings or ExplainSettings()
    target = inspection_device(device)
    models = [(Path(run_dir).name, RunDir(run_dir).model(target)) for run_dir in run_dirs]
    for name, model in models:
        if not model.returns_attention and not model.has_stages:
            raise VitlabError(f"{name} is a '{model.name}' model, which has neither attention nor convolutional stages to show")
    sizes = {name: getattr(model.config, "image_size", 32) for name, model in models}
    if len(set(sizes.values())) > 1:
        raise VitlabError("the runs were trained on images of different sizes (" + ", ".join(f"{name}: {size}×{size}" for name, size in sizes.items())
                          + "); explain runs of one dataset together")
    size = sizes[models[0][0]]
    if settings.steps > size * size:
        raise VitlabError(f"--steps {settings.steps} is more than the {size * size} pixels of a {size}×{size} image; choose at most {size * size}")
    scored = images_to_show(files, max(count, score_images or count), data_dir, errors if errors is not None else [], run_dirs[0], size=size)
    shown = first_images(scored, count, files)
    explanations, notes = explain_runs(models, scored.images, settings)
    out = Path(out) if out else RunDir(run_dirs[0]).figures
    written = [explain_figure(explanations, shown, out / "explain.png")]
    table, scores = out / "explain_scores.md", out / "explain_scores.json"
    atomic_write(table, lambda tmp: Path(tmp).write_text(ranking_markdown(explanations, settings, notes)))
    write_json(scores, ranking_json(explanations, settings, notes))
    written += [table, scores]
    written += [feature_map_figure(model, shown.images[0], out / f"feature_maps_{name}.png") for name, model in models if model.has_stages]
    return written


def predict_files(run_dir: str | Path, files: list[str], top: int = 3, device: str = "auto") -> tuple[list[tuple[str, list[tuple[str, float]]]], list[str]]:
    """Top-k classes with probabilities for every readable image file, and one error line per unreadable one."""
    folder = RunDir(run_dir)
    target = inspection_device(device)
    model = folder.model(target).eval()
    classes = model.input_spec.classes
    if not 1 <= top <= len(classes):
        raise VitlabError(f"--top must be between 1 and {len(classes)}, got {top}")
    size = getattr(model.config, "image_size", 32)
    predictions, errors = [], []
    for path in files:
        try:
            image = load_image_file(path, size=size)
        except ValueError as error:
            errors.append(str(error))
            continue
        with torch.inference_mode():
            probabilities = model(model.input_spec.normalize(image[None].to(target)))[0].float().softmax(dim=0).cpu()
        best = probabilities.topk(top)
        predictions.append((str(path), [(classes[i], float(p)) for p, i in zip(best.values.tolist(), best.indices.tolist(), strict=True)]))
    return predictions, errors
