"""Evaluation: one function that tests any model on labelled uint8 images, with no trainer needed."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vitlab.data import DeviceBatches
from vitlab.models.base import eval_mode
from vitlab.train.device import autocast


@dataclass
class Evaluation:
    """Loss, accuracy (percent) and predictions of a model on one labelled set."""

    loss: float
    accuracy: float
    predictions: torch.Tensor  # (N,) int64, on the CPU
    labels: torch.Tensor  # (N,) int64, on the CPU
    probabilities: torch.Tensor  # (N, classes) float32 softmax, on the CPU

    def per_class_accuracy(self, classes: tuple[str, ...]) -> dict[str, float]:
        result = {}
        for index, name in enumerate(classes):
            mask = self.labels == index
            total = int(mask.sum())
            result[name] = 100.0 * int((self.predictions[mask] == index).sum()) / total if total else float("nan")
        return result


def model_device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def shifted(images: torch.Tensor, dy: int, dx: int, pad_mode: str = "zeros") -> torch.Tensor:
    """Images moved by (dy, dx) pixels, zero-filled (the mean colour, after normalisation) or with `pad_mode`
    'reflect' the image mirrored at its edge."""
    height, width = images.shape[-2:]
    padded = F.pad(images, (abs(dx), abs(dx), abs(dy), abs(dy)), mode="reflect" if pad_mode == "reflect" else "constant")
    top, left = abs(dy) - dy, abs(dx) - dx
    return padded[..., top:top + height, left:left + width]


def tta_logits(forward, images: torch.Tensor, shift: int, pad_mode: str = "zeros") -> torch.Tensor:
    """Mirror TTA, and with `shift` airbench's multi-crop: the image and its mirror weigh 1/2, the four views shifted
    by ±shift pixels (each with its mirror) share the other 1/2."""
    logits = (forward(images).float() + forward(images.flip(3)).float()) / 2
    if not shift:
        return logits
    views = [shifted(images, shift, shift, pad_mode), shifted(images, -shift, -shift, pad_mode)]
    moved = sum(forward(view).float() + forward(view.flip(3)).float() for view in views) / 4
    return (logits + moved) / 2


@torch.inference_mode()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, batch_size: int = 500, precision: str = "fp32",
             tta: bool = False, tta_shift: int = 0, pad_mode: str = "zeros", memory_format: torch.memory_format = torch.contiguous_format,
             forward=None) -> Evaluation:
    """Plain cross-entropy loss (no label smoothing) and accuracy of `model` on uint8 `images` (N, 3, H, W), in order.

    Args:
        precision: 'bf16' evaluates under bf16 autocast, as training did; 'fp32' in full precision.
        tta: average each image's logits with its mirror image's (and with `tta_shift`, shifted views: `tta_logits`).
        pad_mode: what fills the border of TTA's shifted views ('zeros' or 'reflect').
        forward: what to call instead of `model` (e.g. its torch.compile wrapper); defaults to the model.
    """
    forward = model if forward is None else forward  # not `or`: a compiled wrapper has a __len__ that raises
    device = model_device(model)
    spec = getattr(model, "input_spec", None)  # the statistics the model was trained with (CIFAR-10's if unknown)
    statistics = {"mean": spec.mean, "std": spec.std} if spec is not None else {}
    batches = DeviceBatches(images, labels, batch_size, train=False, device=device, memory_format=memory_format, **statistics)
    loss_sum, probabilities = torch.zeros((), dtype=torch.float64, device=device), []
    with eval_mode(model):
        for batch_images, batch_labels in batches:
            with autocast(device, precision):
                logits = tta_logits(forward, batch_images, tta_shift, pad_mode) if tta else forward(batch_images).float()  # (B, classes)
            loss_sum += F.cross_entropy(logits, batch_labels, reduction="sum").double()
            probabilities.append(logits.softmax(dim=1).cpu())
    probabilities = torch.cat(probabilities)  # (N, classes)
    predictions = probabilities.argmax(dim=1)
    labels = labels.cpu()
    accuracy = 100.0 * int((predictions == labels).sum()) / len(labels)
    return Evaluation(loss=float(loss_sum.detach()) / len(labels), accuracy=accuracy, predictions=predictions, labels=labels,
                      probabilities=probabilities)
