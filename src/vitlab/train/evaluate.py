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


@torch.inference_mode()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, batch_size: int = 500, precision: str = "fp32",
             tta: bool = False, memory_format: torch.memory_format = torch.contiguous_format, forward=None) -> Evaluation:
    """Plain cross-entropy loss (no label smoothing) and accuracy of `model` on uint8 `images` (N, 3, H, W), in order.

    Args:
        precision: 'bf16' evaluates under bf16 autocast, as training did; 'fp32' in full precision.
        tta: average each image's logits with its mirror image's.
        forward: what to call instead of `model` (e.g. its torch.compile wrapper); defaults to the model.
    """
    forward = forward or model
    device = model_device(model)
    spec = getattr(model, "input_spec", None)  # the statistics the model was trained with (CIFAR-10's if unknown)
    statistics = {"mean": spec.mean, "std": spec.std} if spec is not None else {}
    batches = DeviceBatches(images, labels, batch_size, train=False, device=device, memory_format=memory_format, **statistics)
    loss_sum, probabilities = torch.zeros((), dtype=torch.float64, device=device), []
    with eval_mode(model):
        for batch_images, batch_labels in batches:
            with autocast(device, precision):
                logits = forward(batch_images).float()  # (B, classes)
                if tta:
                    logits = (logits + forward(batch_images.flip(3)).float()) / 2
            loss_sum += F.cross_entropy(logits, batch_labels, reduction="sum").double()
            probabilities.append(logits.softmax(dim=1).cpu())
    probabilities = torch.cat(probabilities)  # (N, classes)
    predictions = probabilities.argmax(dim=1)
    labels = labels.cpu()
    accuracy = 100.0 * int((predictions == labels).sum()) / len(labels)
    return Evaluation(loss=float(loss_sum) / len(labels), accuracy=accuracy, predictions=predictions, labels=labels,
                      probabilities=probabilities)
