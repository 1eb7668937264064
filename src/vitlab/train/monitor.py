"""Things that watch training epoch by epoch: TensorBoard logging and GIF snapshots.

Each is a callable taking the epoch's record, registered in `Runner.epoch_end_hooks` (rank 0 only).
Snapshots are small safetensors files under RUN_DIR/snapshots/, one per epoch, so the training GIF
can be rebuilt at any time with `vitlab gif RUN_DIR`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vitlab.data import normalize
from vitlab.errors import VitlabError
from vitlab.inspect.attention import attention_stack, rollout_maps
from vitlab.io import write_tensors
from vitlab.models.base import eval_mode
from vitlab.rundir import SNAPSHOT_IMAGES_FILE, RunDir

WATCHED_IMAGES = 8  # the first validation images (the split is fixed by split_seed)


@torch.inference_mode()
def predict_and_attend(model: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Class probabilities (B, classes) of uint8 `images` and, for a ViT, its attention rollout over the
    image (B, H, W), each map scaled to [0, 1]. Runs in fp32 on the model's device."""
    device = next(model.parameters()).device
    spec = getattr(model, "input_spec", None)
    inputs = spec.normalize(images.to(device)) if spec is not None else normalize(images.to(device))
    with eval_mode(model):
        if getattr(model, "returns_attention", False):
            logits, attention = attention_stack(model, inputs)
            maps = rollout_maps(model, attention, images.shape[-1])  # (B, H, W)
            low = maps.amin(dim=(1, 2), keepdim=True)
            maps = (maps - low) / (maps.amax(dim=(1, 2), keepdim=True) - low).clamp_min(1e-12)
        else:
            logits, maps = model(inputs.contiguous(memory_format=torch.channels_last)).float(), None
    return logits.softmax(dim=1).cpu(), None if maps is None else maps.cpu()


class SnapshotRecorder:
    """Saves, after every epoch, the watched images' class probabilities (and a ViT's rollout maps)."""

    def __init__(self, model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, run: RunDir) -> None:
        self.model, self.images, self.labels = model, images, labels
        self.folder = run.snapshots
        self.folder.mkdir(parents=True, exist_ok=True)
        if not (self.folder / SNAPSHOT_IMAGES_FILE).exists():
            tensors = {"images": images.contiguous(), "labels": labels.contiguous()}
            write_tensors(self.folder / SNAPSHOT_IMAGES_FILE, tensors)

    def __call__(self, record: dict) -> None:
        probabilities, maps = predict_and_attend(self.model, self.images)
        tensors = {"probabilities": probabilities.contiguous()}
        if maps is not None:
            tensors["attention"] = maps.half().contiguous()
        write_tensors(self.folder / f"epoch_{record['epoch']:04d}.safetensors", tensors)


def overlay(images: torch.Tensor, maps: torch.Tensor, scale: int = 4) -> torch.Tensor:
    """uint8 images (B, 3, H, W) and maps (B, H, W) in [0, 1] → float RGB (B, 3, sH, sW) with the map as a red heat overlay."""
    base = images.float() / 255.0
    heat = torch.stack([maps, torch.zeros_like(maps), 1 - maps], dim=1)  # red = attended, blue = ignored
    mixed = 0.55 * base + 0.45 * heat
    return F.interpolate(mixed, scale_factor=scale, mode="nearest").clamp(0, 1)


class TensorBoardLogger:
    """Scalars every epoch (loss, accuracy, learning rate, images/s) and, for a ViT, rollout overlays."""

    SCALARS = {"train_loss": "loss/train", "val_loss": "loss/validation", "train_acc": "accuracy/train",
               "val_acc": "accuracy/validation", "lr": "learning_rate", "images_per_second": "images_per_second"}

    def __init__(self, model: torch.nn.Module, images: torch.Tensor, run: RunDir) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise VitlabError("--tensorboard needs the tensorboard package; pip install 'vitlab[tensorboard]'") from None
        self.model, self.images = model, images
        self.writer = SummaryWriter(log_dir=str(run.tensorboard))

    def __call__(self, record: dict) -> None:
        epoch = record["epoch"]
        for key, tag in self.SCALARS.items():
            if key in record:
                self.writer.add_scalar(tag, record[key], epoch)
        if getattr(self.model, "returns_attention", False):
            _, maps = predict_and_attend(self.model, self.images)
            self.writer.add_images("attention_rollout", overlay(self.images, maps), epoch)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
