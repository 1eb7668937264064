"""Figures that look inside trained models: ViT attention grids and attention distance, CNN feature
maps, CNN-vs-ViT explanations side by side, confusion matrix, per-class accuracy, confident mistakes."""

from __future__ import annotations

from pathlib import Path

import torch

from vitlab.data import CLASSES, normalize
from vitlab.errors import VitlabError
from vitlab.inspect.attention import attention_stack, mean_attention_distance, patch_scores, rollout, rollout_maps, to_image_grid
from vitlab.inspect.explain import Explanation
from vitlab.inspect.features import feature_maps
from vitlab.inspect.images import ImageSet
from vitlab.plotting import plt, save_figure


def show_image(axis, image: torch.Tensor, heat: torch.Tensor | None = None, title: str = "", color: str = "black") -> None:
    axis.imshow(image.permute(1, 2, 0).numpy())
    if heat is not None:  # each map stretched to its own range: the pattern, not the absolute level
        heat = heat.float()
        heat = (heat - heat.min()) / (heat.max() - heat.min()).clamp_min(1e-12)
        axis.imshow(heat.numpy(), cmap="jet", alpha=0.5, vmin=0, vmax=1)
    axis.set_title(title, fontsize=8, color=color)
    axis.axis("off")


def prediction_title(probabilities: torch.Tensor, true_label: int, classes: tuple[str, ...] = CLASSES) -> tuple[str, str]:
    predicted = int(probabilities.argmax())
    text = f"pred {classes[predicted]} {100 * float(probabilities[predicted]):.0f}%"
    if true_label < 0 or true_label >= len(classes):
        return text, "black"
    return f"{text}\ntrue {classes[true_label]}", "green" if predicted == true_label else "red"


def model_inputs(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """uint8 images, normalised as the model was trained, on its device."""
    device = next(model.parameters()).device
    spec = getattr(model, "input_spec", None)
    return spec.normalize(images.to(device)) if spec is not None else normalize(images.to(device))


def class_names(model: torch.nn.Module) -> tuple[str, ...]:
    spec = getattr(model, "input_spec", None)
    return spec.classes if spec is not None else CLASSES


# ---------------------------------------------------------------- ViT attention

def vit_attention(model: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities (B, classes) and attention (L, B, heads, T, T) of uint8 images."""
    logits, attention = attention_stack(model, model_inputs(model, images))
    return logits.softmax(dim=1).cpu(), attention.cpu()


def layer_maps(model: torch.nn.Module, attention: torch.Tensor, method: str, head: str, image_size: int) -> torch.Tensor:
    """Per-layer attention over the image: (L, B, heads, T, T) → (L, B, R, H, W) with R = 1 (mean or one
    head) or heads (all). `method` raw: each layer's own attention; rollout: rollout up to that layer."""
    layout = model.token_layout()
    num_layers, _, num_heads = attention.shape[:3]
    if head not in ("mean", "all") and not (head.isdigit() and 1 <= int(head) <= num_heads):
        raise VitlabError(f"--head must be mean, all or a head number 1..{num_heads}, got '{head}'")
    if method not in ("raw", "rollout"):
        raise VitlabError(f"--method must be raw or rollout, got '{method}'")
    per_layer = []
    for layer in range(num_layers):
        if method == "rollout":
            matrices = rollout(attention[: layer + 1])[:, None]  # (B, 1, T, T): heads fused
        else:
            matrices = attention[layer]  # (B, heads, T, T)
            matrices = matrices.mean(dim=1, keepdim=True) if head == "mean" else matrices
            if head.isdigit():
                matrices = matrices[:, int(head) - 1:int(head)]
        per_layer.append(to_image_grid(patch_scores(matrices, layout), layout, image_size))  # (B, R, H, W)
    return torch.stack(per_layer)


def attention_grid(model: torch.nn.Module, images: ImageSet, out_dir: Path, method: str = "raw", head: str = "mean",
                   layers: list[int] | None = None) -> list[Path]:
    """One PNG per image: the image, each chosen layer's attention (rows: heads when head='all'), and
    the full rollout overlaid, titled with predicted and true class."""
    probabilities, attention = vit_attention(model, images.images)
    image_size = images.images.shape[-1]
    maps = layer_maps(model, attention, method, head, image_size)  # (L, B, R, H, W)
    full_rollout = rollout_maps(model, attention, image_size)  # (B, H, W)
    layers = layers or list(range(1, maps.shape[0] + 1))
    rows = maps.shape[2]
    written = []
    for index in range(len(images.images)):
        image = images.images[index]
        figure, axes = plt.subplots(rows, len(layers) + 2, figsize=(1.7 * (len(layers) + 2), 1.9 * rows + 0.4), squeeze=False)
        title, color = prediction_title(probabilities[index], int(images.labels[index]), class_names(model))
        for row in range(rows):
            show_image(axes[row, 0], image, title=title if row == 0 else "", color=color)
            for column, layer in enumerate(layers, start=1):
                label = f"layer {layer}" + (f" head {row + 1}" if rows > 1 else f" head {head}" if head.isdigit() else "")
                show_image(axes[row, column], image, maps[layer - 1, index, row], title=label)
            show_image(axes[row, -1], image, full_rollout[index], title="rollout (all layers)")
        figure.suptitle(f"{images.names[index]}: CLS-to-patch attention ({method}, head {head})"
                        if model.token_layout().readout == "cls" else f"{images.names[index]}: attention received by each patch ({method}, head {head})",
                        fontsize=9)
        written.append(save_figure(figure, out_dir / f"attention_{index:03d}.png"))
    return written


def attention_distance_plot(model: torch.nn.Module, images: torch.Tensor, path: Path) -> Path:
    """Mean attention distance (pixels) of every head in every layer, as in the ViT paper's figure 7."""
    _, attention = vit_attention(model, images)
    layout = model.token_layout()
    distance = mean_attention_distance(attention, layout)  # (L, heads)
    figure, axis = plt.subplots(figsize=(5.5, 3.8))
    layers, heads = distance.shape
    for h in range(heads):
        axis.scatter(range(1, layers + 1), distance[:, h].numpy(), s=18, label=f"head {h + 1}")
    tokens = attention.shape[-1]
    uniform = mean_attention_distance(torch.full((1, 1, 1, tokens, tokens), 1.0 / tokens), layout)  # attending everywhere equally
    axis.axhline(float(uniform), color="gray", linestyle="--", linewidth=1, label="uniform attention")
    axis.set(xlabel="layer", ylabel="mean attention distance (pixels)",
             title=f"attention distance ({len(images)} images, patch {layout.patch_size})")
    axis.set_xticks(range(1, layers + 1))
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, ncol=2)
    return save_figure(figure, path)


# ---------------------------------------------------------------- CNN and side by side

def explain_figure(explanations: list[Explanation], images: ImageSet, path: Path) -> Path:
    """Rows: images. Columns: the image, then each (run, method) map with the run's prediction."""
    count = len(images.images)
    figure, axes = plt.subplots(count, len(explanations) + 1, figsize=(2.0 * (len(explanations) + 1), 2.1 * count), squeeze=False)
    for index in range(count):
        truth = images.true_name(index)
        show_image(axes[index, 0], images.images[index], title=f"{images.names[index]}\ntrue {truth}")
        for column, explanation in enumerate(explanations, start=1):
            title, color = prediction_title(explanation.probabilities[index], int(images.labels[index]), images.classes)
            show_image(axes[index, column], images.images[index], explanation.maps[index],
                       title=f"{explanation.run} ({explanation.label})\n{title.splitlines()[0]}", color=color)
    return save_figure(figure, path)


def feature_map_figure(model: torch.nn.Module, image: torch.Tensor, path: Path, channels: int = 8) -> Path:
    """Each stage's most active channels for one uint8 image (3, H, W)."""
    _, stages = feature_maps(model, model_inputs(model, image[None]))
    figure, axes = plt.subplots(len(stages), channels + 1, figsize=(1.3 * (channels + 1), 1.45 * len(stages)), squeeze=False)
    for row, (name, maps) in enumerate(stages):
        maps = maps[0].cpu()  # (C, h, w)
        strongest = maps.mean(dim=(1, 2)).argsort(descending=True)[:channels]
        show_image(axes[row, 0], image, title=name if row == 0 else name)
        for column, channel in enumerate(strongest.tolist(), start=1):
            axes[row, column].imshow(maps[channel].numpy(), cmap="viridis")
            axes[row, column].set_title(f"ch {channel} {tuple(maps.shape[1:])}", fontsize=6)
            axes[row, column].axis("off")
        for column in range(len(strongest) + 1, channels + 1):
            axes[row, column].axis("off")
    figure.suptitle("feature maps: the most active channels of each stage", fontsize=9)
    return save_figure(figure, path)


# ---------------------------------------------------------------- evaluation figures

def confusion_matrix(predictions: torch.Tensor, labels: torch.Tensor, classes: int = 10) -> torch.Tensor:
    """Counts (classes, classes): row = true class, column = predicted class."""
    return torch.bincount(labels * classes + predictions, minlength=classes * classes).reshape(classes, classes)


def confusion_figure(predictions: torch.Tensor, labels: torch.Tensor, path: Path, title: str = "", classes: tuple[str, ...] = CLASSES) -> Path:
    count = len(classes)
    counts = confusion_matrix(predictions, labels, count)
    shares = counts.double() / counts.sum(dim=1, keepdim=True).clamp_min(1)
    size = min(16.0, 3.0 + 0.35 * count)
    figure, axis = plt.subplots(figsize=(size, size * 0.875))
    axis.imshow(shares.numpy(), cmap="Blues", vmin=0, vmax=1)
    if count <= 20:  # the numbers fit in the cells
        for true in range(count):
            for predicted in range(count):
                axis.text(predicted, true, f"{100 * float(shares[true, predicted]):.0f}", ha="center", va="center", fontsize=7,
                          color="white" if shares[true, predicted] > 0.5 else "black")
    font = 8 if count <= 20 else 5
    axis.set_xticks(range(count), classes, rotation=45 if count <= 20 else 90, ha="right", fontsize=font)
    axis.set_yticks(range(count), classes, fontsize=font)
    axis.set(xlabel="predicted class", ylabel="true class", title=title or "confusion matrix (% of each true class)")
    return save_figure(figure, path)


def per_class_figure(per_class: dict[str, float], path: Path, title: str = "") -> Path:
    figure, axis = plt.subplots(figsize=(6.4, 3.2))
    axis.bar(list(per_class), list(per_class.values()), color="C0")
    for x, value in enumerate(per_class.values()):
        axis.text(x, value + 1, f"{value:.1f}", ha="center", fontsize=7)
    axis.set(ylim=(0, 105), ylabel="test accuracy (%)", title=title or "per-class test accuracy")
    axis.tick_params(axis="x", rotation=45, labelsize=8)
    return save_figure(figure, path)


def mistakes_figure(images: torch.Tensor, labels: torch.Tensor, probabilities: torch.Tensor, path: Path, count: int = 24,
                    classes: tuple[str, ...] = CLASSES) -> Path:
    """The test images the model got wrong with the highest confidence."""
    predictions = probabilities.argmax(dim=1)
    wrong = (predictions != labels).nonzero().flatten()
    confidence = probabilities[wrong, predictions[wrong]]
    chosen = wrong[confidence.argsort(descending=True)[:count]]
    columns = 8
    rows = max(1, -(-len(chosen) // columns))
    figure, axes = plt.subplots(rows, columns, figsize=(1.6 * columns, 1.9 * rows), squeeze=False)
    for slot, axis in enumerate(axes.flat):
        if slot >= len(chosen):
            axis.axis("off")
            continue
        index = int(chosen[slot])
        predicted = int(predictions[index])
        show_image(axis, images[index], title=f"#{index}: {classes[predicted]} {100 * float(probabilities[index, predicted]):.0f}%\n"
                                              f"true {classes[int(labels[index])]}", color="red")
    figure.suptitle("most confident mistakes (predicted, confidence; true class)", fontsize=9)
    return save_figure(figure, path)
