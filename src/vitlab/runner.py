"""The Runner: one training loop and one evaluation loop for every model."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from vitlab.config import DataConfig, TrainConfig
from vitlab.data import CIFAR10, DeviceBatches, normalize
from vitlab.device import autocast, pick_device, resolve_precision
from vitlab.errors import VitlabError
from vitlab.io import append_jsonl
from vitlab.schedule import SCHEDULES

# Parameters that get no weight decay besides biases and norm scales (all 1-D): decaying the
# CLS token or the position table towards zero only erases what they encode.
NO_DECAY_NAMES = ("cls_token", "position_embedding")


@dataclass
class Evaluation:
    """Loss, accuracy (percent) and predictions of a model on one labelled set."""

    loss: float
    accuracy: float
    predictions: torch.Tensor  # (N,) int64, on the CPU
    labels: torch.Tensor  # (N,) int64, on the CPU

    def per_class_accuracy(self, classes: tuple[str, ...]) -> dict[str, float]:
        result = {}
        for index, name in enumerate(classes):
            mask = self.labels == index
            total = int(mask.sum())
            result[name] = 100.0 * int((self.predictions[mask] == index).sum()) / total if total else float("nan")
        return result


def parameter_groups(model: nn.Module, config: TrainConfig) -> list[dict]:
    """Weights get weight decay; biases, norms, CLS token and positions do not (AdamW). For SGD
    (airbench's recipe) everything decays, and normalisation biases can get a larger learning rate."""
    decay, no_decay, norm_biases = [], [], []
    norm_modules = (nn.BatchNorm2d, nn.LayerNorm)
    norm_bias_ids = {id(m.bias) for m in model.modules() if isinstance(m, norm_modules) and m.bias is not None}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if config.optimizer == "sgd":
            (norm_biases if id(parameter) in norm_bias_ids else decay).append(parameter)
        elif parameter.ndim < 2 or any(key in name for key in NO_DECAY_NAMES):
            no_decay.append(parameter)
        else:
            decay.append(parameter)
    scale = config.norm_bias_lr_scale
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0},
              {"params": norm_biases, "weight_decay": config.weight_decay / scale, "lr": config.lr * scale}]
    return [group for group in groups if group["params"]]


class Runner:
    """Trains a model with a `TrainConfig`, validates it every epoch and tests it at the end.

    Example:
        runner = Runner(model, TrainConfig(epochs=10))
        history = runner.fit(load_cifar10())
        print(runner.evaluate(data.test_images, data.test_labels).accuracy)

    Args:
        model: any module mapping normalised images (B, 3, 32, 32) to logits (B, classes).
        config: the recipe (optimiser, schedule, precision, device, seed).
        data_config: augmentation settings (crop padding, flips).
        history_file: if given, every epoch's metrics are appended there as one JSON line.
    """

    def __init__(
        self,
        model: nn.Module,
        config: TrainConfig | None = None,
        data_config: DataConfig | None = None,
        history_file: str | Path | None = None,
    ) -> None:
        self.config = config or TrainConfig()
        self.data_config = data_config or DataConfig()
        self.device = pick_device(self.config.device)
        self.precision = resolve_precision(self.config.precision, self.device)
        has_convolutions = any(isinstance(m, nn.Conv2d) and m.kernel_size != m.stride for m in model.modules())
        self.memory_format = torch.channels_last if self.config.channels_last and has_convolutions else torch.contiguous_format
        self.model = model.to(self.device, memory_format=self.memory_format)
        # The compiled wrapper shares its parameters with self.model, which is what gets saved.
        self.forward = torch.compile(self.model) if self.config.compile else self.model
        self.history_file = Path(history_file) if history_file else None
        self.history: list[dict] = []
        self.train_seconds = 0.0
        self.train_images_seen = 0

    def make_optimizer(self) -> torch.optim.Optimizer:
        cfg = self.config
        groups = parameter_groups(self.model, cfg)
        if cfg.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
        # Fused AdamW is one kernel per step on CUDA; on the CPU the foreach version is the default.
        fused = {"fused": True} if self.device.type == "cuda" else {}
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), **fused)

    def fit(self, data: CIFAR10) -> list[dict]:
        """Train for `config.epochs` epochs on `data.train_*`, validating on `data.val_*` after each."""
        cfg = self.config
        batches = DeviceBatches(
            data.train_images, data.train_labels, cfg.batch_size, train=True, device=self.device,
            seed=cfg.seed, crop_padding=self.data_config.crop_padding, flip=self.data_config.flip, memory_format=self.memory_format,
        )
        if len(batches) == 0:
            raise VitlabError(f"batch_size {cfg.batch_size} is larger than the {len(data.train_images)} training images; lower --batch_size")
        init_from_data = getattr(self.model, "init_from_data", None)
        if init_from_data is not None:  # e.g. AirCNN's whitening layer, set from the first 5,000 training images
            init_from_data(normalize(data.train_images[:5000].to(self.device)))
        optimizer = self.make_optimizer()
        steps_per_epoch, total_steps = len(batches), len(batches) * cfg.epochs
        warmup_steps = round(cfg.warmup_epochs * steps_per_epoch)
        multiplier = SCHEDULES[cfg.schedule]
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: multiplier(step, warmup_steps, total_steps, cfg.min_lr_ratio)
        )
        for epoch in range(1, cfg.epochs + 1):
            record = self.train_epoch(batches, optimizer, schedule, epoch)
            validation = self.evaluate(data.val_images, data.val_labels)
            record.update(val_loss=validation.loss, val_acc=validation.accuracy)
            self.history.append(record)
            if self.history_file is not None:
                append_jsonl(self.history_file, record)
            if cfg.progress:
                tqdm.write(
                    f"epoch {epoch}/{cfg.epochs}: train loss {record['train_loss']:.4f} acc {record['train_acc']:.2f}% | "
                    f"val loss {record['val_loss']:.4f} acc {record['val_acc']:.2f}% | {record['images_per_second']:.0f} img/s"
                )
        return self.history

    def train_step(self, images: torch.Tensor, labels: torch.Tensor, optimizer: torch.optim.Optimizer) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimisation step on a batch; returns the detached loss () and logits (B, classes)."""
        with autocast(self.device, self.precision):
            logits = self.forward(images)  # (B, classes)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.config.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        optimizer.step()
        return loss.detach(), logits.detach()

    def train_epoch(self, batches: DeviceBatches, optimizer, schedule, epoch: int) -> dict:
        cfg = self.config
        self.model.train()
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        seen = 0
        bar = tqdm(total=len(batches), desc=f"epoch {epoch}/{cfg.epochs}", unit="step", disable=not cfg.progress, leave=False)
        start = time.perf_counter()
        for step, (images, labels) in enumerate(batches):
            loss, logits = self.train_step(images, labels, optimizer)
            schedule.step()
            loss_sum += loss * len(labels)
            correct += (logits.argmax(dim=1) == labels).sum()
            seen += len(labels)
            # Reading a number from the device waits for it, so do it only every few steps.
            if step % 10 == 9 or step == len(batches) - 1:
                mean_loss = loss_sum.item() / seen
                if not math.isfinite(mean_loss):
                    raise VitlabError(f"training loss became {mean_loss} in epoch {epoch}; lower --lr or set --grad_clip 1.0")
                elapsed = time.perf_counter() - start
                bar.set_postfix(loss=f"{mean_loss:.3f}", acc=f"{100.0 * correct.item() / seen:.1f}%", img_s=f"{seen / elapsed:.0f}")
                bar.update(step + 1 - bar.n)
        bar.close()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        self.train_seconds += seconds
        self.train_images_seen += seen
        return {
            "epoch": epoch,
            "train_loss": loss_sum.item() / seen,
            "train_acc": 100.0 * correct.item() / seen,
            "lr": optimizer.param_groups[0]["lr"],
            "epoch_seconds": seconds,
            "images_per_second": seen / seconds,
        }

    @torch.inference_mode()
    def evaluate(self, images: torch.Tensor, labels: torch.Tensor) -> Evaluation:
        """Plain cross-entropy loss (no label smoothing) and accuracy on uint8 images, in order."""
        self.model.eval()
        batches = DeviceBatches(images, labels, self.config.eval_batch_size, train=False, device=self.device, memory_format=self.memory_format)
        loss_sum, predictions = 0.0, []
        for batch_images, batch_labels in batches:
            with autocast(self.device, self.precision):
                logits = self.forward(batch_images).float()
                if self.config.tta:  # average with the mirror image's logits
                    logits = (logits + self.forward(batch_images.flip(3)).float()) / 2
            loss_sum += F.cross_entropy(logits.float(), batch_labels, reduction="sum").item()
            predictions.append(logits.argmax(dim=1).cpu())
        predictions = torch.cat(predictions)
        labels = labels.cpu()
        accuracy = 100.0 * int((predictions == labels).sum()) / len(labels)
        return Evaluation(loss=loss_sum / len(labels), accuracy=accuracy, predictions=predictions, labels=labels)
