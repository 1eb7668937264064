"""What `vitlab explain` computes: for several runs and several methods, where each model looks on the
same images, and how faithful each map is (deletion / insertion AUC, see faithfulness.py), ranked.

Methods: the CAMs of cams.py (gradcam, gradcam++, scorecam, eigencam, layercam) on CNNs and ViTs;
`rollout` (attention rollout) and `gradrollout` (gradient-weighted rollout) on ViTs; `auto` is Grad-CAM
for a CNN and rollout for a ViT. Every map explains the class the model predicts for the image.
figures.py draws the maps; reports.py writes the figure and the ranking table.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vitlab.data import normalize
from vitlab.errors import VitlabError
from vitlab.inspect.attention import HEAD_FUSIONS, attention_stack, attention_with_gradients, rollout_maps
from vitlab.inspect.cams import CAM_METHODS, cam_layer, cam_maps
from vitlab.inspect.faithfulness import Faithfulness, deletion_insertion
from vitlab.models.base import eval_mode

ATTENTION_METHODS = ("rollout", "gradrollout")
METHODS = (*CAM_METHODS, *ATTENTION_METHODS)
AUTO = "auto"
METHOD_LABELS = {"gradcam": "Grad-CAM", "gradcam++": "Grad-CAM++", "scorecam": "Score-CAM", "eigencam": "EigenCAM", "layercam": "LayerCAM",
                 "rollout": "attention rollout", "gradrollout": "grad-weighted rollout"}


@dataclass
class ExplainSettings:
    """How `vitlab explain` explains.

    Args:
        methods: methods to run on every run they apply to (see METHODS), or ('auto',): Grad-CAM for CNNs, rollout for ViTs.
        head_fusion: how rollout fuses the heads of a layer: mean, max or min.
        discard_ratio: share of each layer's weakest fused attention entries rollout drops (0 keeps all).
        steps: pixel steps of the deletion and insertion curves.
    """

    methods: tuple[str, ...] = (AUTO,)
    head_fusion: str = "mean"
    discard_ratio: float = 0.0
    steps: int = 32

    def __post_init__(self) -> None:
        self.methods = tuple(self.methods)
        unknown = [method for method in self.methods if method not in (*METHODS, AUTO)]
        if unknown or not self.methods:
            raise VitlabError(f"unknown method '{unknown[0] if unknown else ''}'; --methods takes a comma-separated list of "
                              f"{', '.join(METHODS)} (or {AUTO})")
        if self.head_fusion not in HEAD_FUSIONS:
            raise VitlabError(f"--head-fusion must be one of {', '.join(HEAD_FUSIONS)}, got '{self.head_fusion}'")
        if not 0.0 <= self.discard_ratio < 1.0:
            raise VitlabError(f"--discard-ratio must be in [0, 1), got {self.discard_ratio}")
        if self.steps < 1:
            raise VitlabError(f"--steps must be at least 1, got {self.steps}")


@dataclass
class Explanation:
    """One method's maps for one run's model on a batch of images, and their faithfulness."""

    run: str
    model: str  # 'cnn-small', 'timm:resnet18', ...
    method: str
    layer: str  # what the method explains
    probabilities: torch.Tensor  # (B, classes) on the clean images
    maps: torch.Tensor  # (B, H, W) in [0, 1]
    faithfulness: Faithfulness

    @property
    def label(self) -> str:
        return METHOD_LABELS[self.method]


def model_label(model: nn.Module) -> str:
    """'cnn-small', 'vit', or 'timm:resnet18' for a timm model."""
    name = getattr(model, "name", type(model).__name__)
    return f"{name}:{model.config.architecture}" if name == "timm" else name


def applies(model: nn.Module, method: str) -> bool:
    if method in ATTENTION_METHODS:
        return bool(getattr(model, "returns_attention", False))
    return bool(getattr(model, "returns_attention", False) or getattr(model, "has_stages", False))


def methods_for(model: nn.Module, methods: tuple[str, ...]) -> list[str]:
    """The methods (with 'auto' resolved) that apply to `model`, in the order given."""
    resolved = []
    for method in methods:
        if method == AUTO:
            method = "rollout" if getattr(model, "returns_attention", False) else "gradcam"
        if applies(model, method) and method not in resolved:
            resolved.append(method)
    return resolved


def scaled_to_unit(maps: torch.Tensor) -> torch.Tensor:
    """Each map (B, H, W) stretched to [0, 1] (a constant map becomes 0)."""
    low = maps.amin(dim=(1, 2), keepdim=True)
    return (maps - low) / (maps.amax(dim=(1, 2), keepdim=True) - low).clamp_min(1e-12)


def explanation_maps(model: nn.Module, inputs: torch.Tensor, method: str, class_index: torch.Tensor,
                     settings: ExplainSettings) -> tuple[torch.Tensor, str]:
    """Maps (B, H, W) in [0, 1] of `method` for normalised `inputs` explaining `class_index` (B,), and the explained layer."""
    image_size = inputs.shape[-1]
    if method == "rollout":
        _, attention = attention_stack(model, inputs)
        maps = rollout_maps(model, attention, image_size, settings.head_fusion, settings.discard_ratio)
        return scaled_to_unit(maps).cpu(), f"all {attention.shape[0]} attention layers"
    if method == "gradrollout":
        _, attention, gradients = attention_with_gradients(model, inputs, class_index)
        maps = rollout_maps(model, attention, image_size, settings.head_fusion, settings.discard_ratio, gradients=gradients)
        return scaled_to_unit(maps).cpu(), f"all {attention.shape[0]} attention layers"
    layer = cam_layer(model, inputs)
    maps, _ = cam_maps(model, inputs, method, class_index, layer)
    return maps, layer.description


def explain_runs(models: list[tuple[str, nn.Module]], images: torch.Tensor, settings: ExplainSettings) -> tuple[list[Explanation], list[str]]:
    """Every applicable (run, method) on uint8 `images` (B, 3, H, W); and a note for each method that
    applies to none of the runs' models or to only some."""
    explanations, notes = [], []
    for run, model in models:
        device = next(model.parameters()).device
        spec = getattr(model, "input_spec", None)  # the normalisation the model was trained with
        inputs = (spec.normalize(images.to(device)) if spec is not None else normalize(images.to(device))).float()
        with eval_mode(model), torch.no_grad():
            logits = model(inputs).float()
        class_index = logits.argmax(dim=1)
        for method in methods_for(model, settings.methods):
            maps, layer = explanation_maps(model, inputs, method, class_index, settings)
            explanations.append(Explanation(run, model_label(model), method, layer, logits.softmax(dim=1).cpu(), maps,
                                            deletion_insertion(model, inputs, maps, class_index, settings.steps)))
        skipped = [method for method in settings.methods if method != AUTO and not applies(model, method)]
        if skipped:
            notes.append(f"{', '.join(skipped)} not run on {run} ({model_label(model)} has no attention)")
    if not explanations:
        raise VitlabError("none of the methods applies to these runs; rollout and gradrollout need a ViT, the CAMs a CNN or ViT")
    return explanations, notes


def ranked(explanations: list[Explanation]) -> list[Explanation]:
    """Best first by insertion - deletion AUC."""
    return sorted(explanations, key=lambda explanation: -explanation.faithfulness.score)


def ranking_markdown(explanations: list[Explanation], settings: ExplainSettings, notes: list[str]) -> str:
    """The ranking as a Markdown table with a short legend."""
    images = len(explanations[0].faithfulness.deletion_per_image)
    lines = [
        "# Explanations ranked by faithfulness", "",
        f"{images} images; each map explains the class its model predicts. Deletion AUC (lower is better): probability of that "
        f"class as the most salient pixels are replaced by the dataset's mean colour; insertion AUC (higher is better): as they are "
        f"put back into a blurred copy (Petsiuk et al. 2018, RISE; {settings.steps} steps). Mean ± standard error over the images. "
        f"Rollout: heads fused by {settings.head_fusion}, discard ratio {settings.discard_ratio:g}.", "",
        "| rank | run | model | method | explained layer | deletion AUC ↓ | insertion AUC ↑ | insertion − deletion ↑ |",
        "|---:|---|---|---|---|---:|---:|---:|",
    ]
    for rank, explanation in enumerate(ranked(explanations), start=1):
        scores = explanation.faithfulness.as_dict()
        lines.append(f"| {rank} | {explanation.run} | {explanation.model} | {explanation.label} | {explanation.layer} "
                     f"| {scores['deletion_auc']:.3f} ± {scores['deletion_auc_se']:.3f} | {scores['insertion_auc']:.3f} ± {scores['insertion_auc_se']:.3f} "
                     f"| {scores['score']:.3f} ± {scores['score_se']:.3f} |")
    lines += [""] + [f"- {note}" for note in notes]
    return "\n".join(lines).rstrip() + "\n"


def ranking_json(explanations: list[Explanation], settings: ExplainSettings, notes: list[str]) -> dict:
    """The ranking with every per-image value, for scripts."""
    return {
        "definition": "deletion/insertion AUC (Petsiuk et al. 2018, RISE): probability of the predicted class vs share of pixels "
                      "removed (to the mean colour) or inserted (into a blurred copy), most salient first; score = insertion - deletion",
        "steps": settings.steps, "head_fusion": settings.head_fusion, "discard_ratio": settings.discard_ratio, "notes": notes,
        "ranking": [{"rank": rank, "run": e.run, "model": e.model, "method": e.method, "layer": e.layer} | e.faithfulness.as_dict()
                    for rank, e in enumerate(ranked(explanations), start=1)],
    }
