"""The Runner: one training loop and one evaluation loop for every model."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from vitlab.checkpoint import Progress, TrainingInterrupted, load_checkpoint, save_checkpoint, stop_on_signals
from vitlab.config import DataConfig, TrainConfig
from vitlab.data import CIFAR10, DeviceBatches, normalize
from vitlab.device import autocast, pick_device, resolve_precision
from vitlab.distributed import SINGLE, DistContext, all_reduce_sum, any_rank
from vitlab.errors import VitlabError
from vitlab.io import append_jsonl, write_jsonl
from vitlab.mixing import mix_batch
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
    probabilities: torch.Tensor  # (N, classes) float32 softmax, on the CPU

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
        distributed: DistContext = SINGLE,
    ) -> None:
        self.config = config or TrainConfig()
        self.data_config = data_config or DataConfig()
        self.distributed = distributed
        self.device = pick_device(self.config.device)
        if distributed.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", distributed.local_rank)
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # batch statistics over the global batch
        self.precision = resolve_precision(self.config.precision, self.device)
        if self.device.type == "cuda":
            # Fixed shapes every step: let cuDNN pick the fastest convolution once; TF32 for fp32 matmuls.
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        # channels_last measured in bf16 on the 2-core Sapphire Rapids: cnn-small 8,736 -> 14,430 img/s,
        # cnn 397 -> 472, aircnn 601 -> 806. (A ViT's patchify conv, kernel = stride, gains nothing.)
        has_convolutions = any(isinstance(m, nn.Conv2d) and m.kernel_size != m.stride for m in model.modules())
        self.memory_format = torch.channels_last if self.config.channels_last and has_convolutions else torch.contiguous_format
        self.model = model.to(self.device, memory_format=self.memory_format)
        # The compiled wrapper shares its parameters with self.model, which is what gets saved.
        self.forward = torch.compile(self.model) if self.config.compile else self.model
        # Training steps go through DDP (gradient all-reduce); evaluation uses the plain module, since
        # every rank evaluates the whole set and needs no collectives.
        self.train_forward = self.forward
        if distributed.enabled:
            ddp = DistributedDataParallel(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            self.train_forward = torch.compile(ddp) if self.config.compile else ddp
        self.history_file = Path(history_file) if history_file else None
        # Called with each epoch's record after validation (TensorBoard, GIF snapshots, ...).
        self.epoch_end_hooks: list[Callable[[dict], None]] = []
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

    def fit(self, data: CIFAR10, checkpoint_path: str | Path | None = None, checkpoint_every: int = 0, resume: bool = False) -> list[dict]:
        """Train for `config.epochs` epochs on `data.train_*`, validating on `data.val_*` after each.

        Args:
            checkpoint_path: where to keep the checkpoint (written after every epoch, and on SIGINT/SIGTERM).
            checkpoint_every: also write it every this many steps (0: only at epoch ends).
            resume: continue from the checkpoint at `checkpoint_path` instead of starting afresh.
        """
        cfg = self.config
        batches = DeviceBatches(
            data.train_images, data.train_labels, cfg.batch_size, train=True, device=self.device,
            seed=cfg.seed, crop_padding=self.data_config.crop_padding, flip=self.data_config.flip, memory_format=self.memory_format,
            shard=(self.distributed.rank, self.distributed.world_size),
        )
        if len(batches) == 0:
            raise VitlabError(f"batch_size {cfg.batch_size} is larger than the {len(data.train_images)} training images; lower --batch_size")
        init_from_data = getattr(self.model, "init_from_data", None)
        if init_from_data is not None and not resume:  # e.g. AirCNN's whitening layer, from 5,000 training images
            init_from_data(normalize(data.train_images[:5000].to(self.device)))
        optimizer = self.make_optimizer()
        steps_per_epoch, total_steps = len(batches), len(batches) * cfg.epochs
        warmup_steps = round(cfg.warmup_epochs * steps_per_epoch)
        multiplier = SCHEDULES[cfg.schedule]
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: multiplier(step, warmup_steps, total_steps, cfg.min_lr_ratio)
        )
        checkpoint_path = Path(checkpoint_path) if checkpoint_path else None
        progress = Progress()
        if resume:
            progress = self.restore(load_checkpoint(checkpoint_path), optimizer, schedule, batches)
        writes = checkpoint_path is not None and self.distributed.is_main  # only rank 0 writes files
        save = (lambda: self.save(checkpoint_path, optimizer, schedule, batches, progress)) if writes else (lambda: None)
        # Moved once here, not copied to the device by every epoch's validation.
        val_images, val_labels = data.val_images.to(self.device), data.val_labels.to(self.device)
        with stop_on_signals() as stop:
            while progress.epoch <= cfg.epochs:
                record = self.train_epoch(batches, optimizer, schedule, progress, stop, save, checkpoint_every)
                validation = self.evaluate(val_images, val_labels)
                record.update(val_loss=validation.loss, val_acc=validation.accuracy)
                self.history.append(record)
                progress = Progress(epoch=progress.epoch + 1)
                save()
                if self.history_file is not None and self.distributed.is_main:
                    append_jsonl(self.history_file, record)
                for hook in self.epoch_end_hooks:
                    hook(record)
                if cfg.progress and self.distributed.is_main:
                    tqdm.write(
                        f"epoch {record['epoch']}/{cfg.epochs}: train loss {record['train_loss']:.4f} acc {record['train_acc']:.2f}% | "
                        f"val loss {record['val_loss']:.4f} acc {record['val_acc']:.2f}% | {record['images_per_second']:.0f} img/s"
                    )
        return self.history

    def save(self, path: Path, optimizer, schedule, batches: DeviceBatches, progress: Progress) -> None:
        save_checkpoint(path, {
            "model": self.model.state_dict(), "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
            "torch_rng": torch.get_rng_state(), "batch_rng": batches.generator.get_state(),
            "host_batch_rng": batches.host_generator.get_state(),
            # Dropout on a GPU draws from the device's own generator.
            "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else torch.empty(0, dtype=torch.uint8),
            "progress": dataclasses.asdict(progress), "history": self.history,
            "train_seconds": self.train_seconds, "train_images_seen": self.train_images_seen,
        })

    def restore(self, state: dict, optimizer, schedule, batches: DeviceBatches) -> Progress:
        try:
            self.model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            schedule.load_state_dict(state["schedule"])
            torch.set_rng_state(state["torch_rng"])
            batches.generator.set_state(state["batch_rng"])
            if "host_batch_rng" in state:
                batches.host_generator.set_state(state["host_batch_rng"])
            if self.device.type == "cuda" and state.get("cuda_rng") is not None and state["cuda_rng"].numel():
                torch.cuda.set_rng_state(state["cuda_rng"], self.device)
            progress = Progress(**state["progress"])
            self.history = list(state["history"])
            self.train_seconds, self.train_images_seen = state["train_seconds"], state["train_images_seen"]
        except (KeyError, TypeError, ValueError, RuntimeError) as error:
            reason = str(error).strip().splitlines()[0][:200]
            raise VitlabError(f"the checkpoint does not fit this run ({reason}); it comes from another model or config") from None
        if progress.order is not None:
            progress.order = progress.order.to(self.device)
        if self.history_file is not None and self.distributed.is_main:  # the file may hold epochs the checkpoint does not: rewrite it
            write_jsonl(self.history_file, self.history)
        return progress

    def train_step(self, images: torch.Tensor, labels: torch.Tensor, optimizer: torch.optim.Optimizer,
                   partner_labels: torch.Tensor | None = None, weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimisation step on a batch; returns the detached loss () and logits (B, classes).

        For a MixUp/CutMix batch, `weight` of each image is `labels`' class and the rest `partner_labels`'.
        """
        with autocast(self.device, self.precision):
            logits = self.train_forward(images)  # (B, classes)
        smoothing = self.config.label_smoothing
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=smoothing)
        if partner_labels is not None and weight < 1.0:
            loss = weight * loss + (1.0 - weight) * F.cross_entropy(logits.float(), partner_labels, label_smoothing=smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        optimizer.step()
        return loss.detach(), logits.detach()

    def train_epoch(self, batches: DeviceBatches, optimizer, schedule, progress: Progress, stop, save, checkpoint_every: int) -> dict:
        """Run the rest of the epoch in `progress` (from its step on), updating `progress` as it goes."""
        cfg, epoch = self.config, progress.epoch
        self.model.train()
        if progress.order is None:
            progress.order = batches.new_order()
        loss_sum = torch.tensor(progress.loss_sum, device=self.device)
        correct = torch.tensor(progress.correct, device=self.device, dtype=torch.long)
        bar = tqdm(total=len(batches), initial=progress.step, desc=f"epoch {epoch}/{cfg.epochs}", unit="step",
                   disable=not cfg.progress or not self.distributed.is_main, leave=False)
        start, seconds_before = time.perf_counter(), progress.seconds

        def sync_progress() -> tuple[float, float, int]:
            """Copy this rank's running sums into `progress`; returns (loss sum, correct, seen) over all ranks."""
            progress.loss_sum, progress.correct = loss_sum.item(), correct.item()
            progress.seconds = seconds_before + time.perf_counter() - start
            totals = all_reduce_sum(torch.tensor([progress.loss_sum, progress.correct, progress.seen], dtype=torch.float64,
                                                 device=self.device), self.distributed).tolist()
            if not math.isfinite(totals[0]):  # the last good checkpoint stays untouched
                raise VitlabError(f"training loss became {totals[0] / totals[2]} in epoch {epoch}; lower --lr or set --grad_clip 1.0")
            return totals[0], totals[1], int(totals[2])

        for step in range(progress.step, len(batches)):
            images, labels = batches.batch(step, progress.order)
            mixed = mix_batch(images, labels, cfg.mixup, cfg.cutmix, batches.host_generator)
            loss, logits = self.train_step(mixed.images, labels, optimizer, mixed.partner_labels, mixed.weight)
            schedule.step()
            loss_sum += loss * len(labels)
            correct += (logits.argmax(dim=1) == mixed.dominant_labels).sum()
            progress.seen += len(labels)
            progress.step = step + 1
            # Reading a number from the device waits for it, so do it only every few steps.
            sync_point = step % 10 == 9 or step == len(batches) - 1
            if sync_point:
                loss_total, correct_total, seen_total = sync_progress()
                bar.set_postfix(loss=f"{loss_total / seen_total:.3f}", acc=f"{100.0 * correct_total / seen_total:.1f}%",
                                img_s=f"{seen_total / max(progress.seconds, 1e-9):.0f}")
                bar.update(progress.step - bar.n)
            global_step = (epoch - 1) * len(batches) + progress.step
            # With several processes, all of them stop at the same sync point (a signal reaches them at different steps).
            stopping = bool(stop) if not self.distributed.enabled else sync_point and any_rank(bool(stop), self.distributed, self.device)
            if stopping or (checkpoint_every and global_step % checkpoint_every == 0 and progress.step < len(batches)):
                sync_progress()
                save()
                if stopping:
                    bar.close()
                    raise TrainingInterrupted(stop.signal_name or "another process's signal")
        bar.close()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        loss_total, correct_total, seen_total = sync_progress()
        self.train_seconds += progress.seconds
        self.train_images_seen += seen_total
        return {
            "epoch": epoch,
            "train_loss": loss_total / seen_total,
            "train_acc": 100.0 * correct_total / seen_total,
            "lr": optimizer.param_groups[0]["lr"],
            "epoch_seconds": progress.seconds,
            "images_per_second": seen_total / progress.seconds,
        }

    @torch.inference_mode()
    def evaluate(self, images: torch.Tensor, labels: torch.Tensor) -> Evaluation:
        """Plain cross-entropy loss (no label smoothing) and accuracy on uint8 images, in order."""
        self.model.eval()
        batches = DeviceBatches(images, labels, self.config.eval_batch_size, train=False, device=self.device, memory_format=self.memory_format)
        loss_sum, probabilities = 0.0, []
        for batch_images, batch_labels in batches:
            with autocast(self.device, self.precision):
                logits = self.forward(batch_images).float()
                if self.config.tta:  # average with the mirror image's logits
                    logits = (logits + self.forward(batch_images.flip(3)).float()) / 2
            loss_sum += F.cross_entropy(logits.float(), batch_labels, reduction="sum").item()
            probabilities.append(logits.softmax(dim=1).cpu())
        probabilities = torch.cat(probabilities)  # (N, classes)
        predictions = probabilities.argmax(dim=1)
        labels = labels.cpu()
        accuracy = 100.0 * int((predictions == labels).sum()) / len(labels)
        return Evaluation(loss=loss_sum / len(labels), accuracy=accuracy, predictions=predictions, labels=labels,
                          probabilities=probabilities)
