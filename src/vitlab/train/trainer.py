"""The Runner: one training loop for every model (the evaluation loop is `vitlab.train.evaluate`)."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from vitlab.config import DataConfig, TrainConfig, epochs_for
from vitlab.data import CIFAR10, DeviceBatches, normalize
from vitlab.errors import VitlabError
from vitlab.kernels import release_buffers
from vitlab.train.checkpoint import Progress, TrainingInterrupted, TrainingState, load_checkpoint, save_checkpoint, stop_on_signals
from vitlab.train.device import Placement, autocast, place_model
from vitlab.train.distributed import SINGLE, DistContext, all_reduce_sum, any_rank, no_gradient_sync
from vitlab.train.ema import WeightAverage
from vitlab.train.evaluate import Evaluation, evaluate
from vitlab.train.mixing import mix_batch
from vitlab.train.optim import make_optimizer, make_schedule, parameter_groups, stopped_parameters  # noqa: F401  (parameter_groups: public)


@contextlib.contextmanager
def thawed_on_exit():
    """A list to collect frozen parameters in; they train again (requires_grad) when the block exits, however it exits."""
    frozen: list[nn.Parameter] = []
    try:
        yield frozen
    finally:
        for parameter in frozen:
            parameter.requires_grad_(True)


class Runner:
    """Trains a model with a `TrainConfig`, validates it every epoch and tests it at the end.

    Example:
        runner = Runner(model, TrainConfig(epochs=10))
        history = runner.fit(load_cifar10())
        print(runner.evaluate(data.test_images, data.test_labels).accuracy)

    Args:
        model: any module mapping normalised images (B, 3, H, W) to logits (B, classes).
        config: the recipe (optimiser, schedule, precision, device, seed).
        data_config: augmentation settings (crop padding, flips).
        history_file: if given, every epoch's metrics are appended there as one JSON line.
        distributed: the process group this process belongs to (`torchrun`), if any.
    """

    def __init__(self, model: nn.Module, config: TrainConfig | None = None, data_config: DataConfig | None = None,
                 history_file: str | Path | None = None, distributed: DistContext = SINGLE) -> None:
        self.config = config or TrainConfig()
        self.data_config = data_config or DataConfig()
        self.distributed = distributed
        placement: Placement = place_model(model, self.config, distributed)
        self.model, self.device, self.precision, self.memory_format = placement.model, placement.device, placement.precision, placement.memory_format
        self.forward, self.train_forward = placement.forward, placement.train_forward
        self.history_file = Path(history_file) if history_file else None
        # Called with each epoch's record after validation (TensorBoard, GIF snapshots, ...).
        self.epoch_end_hooks: list[Callable[[dict], None]] = []
        self.history: list[dict] = []
        self.train_seconds = 0.0
        self.train_images_seen = 0
        self.epochs = self.config.epochs  # fit() sets what the data make of it (images_budget)
        self.ema: WeightAverage | None = None

    def make_optimizer(self) -> torch.optim.Optimizer:
        return make_optimizer(self.model, self.config, self.device)

    def fit(self, data: CIFAR10, checkpoint_path: str | Path | None = None, checkpoint_every: int = 0, resume: bool = False) -> list[dict]:
        """Train for `config.epochs` epochs (see `epochs_for`) on `data.train_*`, validating on `data.val_*` after each.

        Args:
            checkpoint_path: where to keep the checkpoint (written after every epoch, and on SIGINT/SIGTERM).
            checkpoint_every: also write it every this many steps (0: only at epoch ends).
            resume: continue from the checkpoint at `checkpoint_path` instead of starting afresh.
        """
        cfg = self.config
        train_images, train_labels = data.train_images, data.train_labels
        if self.data_config.train_on_validation:  # the test set stays untouched
            train_images, train_labels = torch.cat([train_images, data.val_images]), torch.cat([train_labels, data.val_labels])
        batches = DeviceBatches(
            train_images, train_labels, cfg.batch_size, train=True, device=self.device,
            seed=cfg.seed, crop_padding=self.data_config.crop_padding, flip=self.data_config.flip, memory_format=self.memory_format,
            shard=(self.distributed.rank, self.distributed.world_size), trivial_augment=self.data_config.trivial_augment,
            random_erasing=self.data_config.random_erasing, mean=data.mean, std=data.std,
            alternating_flip=self.data_config.alternating_flip, pad_mode=self.data_config.pad_mode,
        )
        if hasattr(self.model, "input_spec"):  # evaluation and every later command normalise as training did
            self.model.input_spec = data.input_spec()
        if len(batches) == 0:
            raise VitlabError(f"batch_size {cfg.batch_size} is larger than the {len(train_images)} training images; lower --batch_size")
        if len(data.val_images) == 0:
            raise VitlabError("the validation split is empty; raise --val_fraction or --subset")
        if not resume and hasattr(self.model, "init_from_data"):  # e.g. AirCNN's whitening layer, from 5,000 training images
            self.model.init_from_data(normalize(data.train_images[:5000].to(self.device), mean=data.mean, std=data.std))
        self.epochs = epochs_for(cfg, len(train_images))
        optimizer = self.make_optimizer()
        schedule = make_schedule(optimizer, cfg, len(batches), self.epochs)
        self.ema = WeightAverage(self.model, cfg.ema_decay) if cfg.ema_decay > 0 else None
        state = TrainingState(self.model, optimizer, schedule, batches.generator, batches.host_generator, self.device, self.ema)
        checkpoint_path = Path(checkpoint_path) if checkpoint_path else None
        progress = Progress()
        if resume:
            progress, self.history, self.train_seconds, self.train_images_seen = state.load_state_dict(load_checkpoint(checkpoint_path))
            if self.history_file is not None and self.distributed.is_main:  # the file may hold epochs the checkpoint does not
                from vitlab.io import write_jsonl

                write_jsonl(self.history_file, self.history)
        writes = checkpoint_path is not None and self.distributed.is_main  # only rank 0 writes files

        def save() -> None:
            if writes:
                save_checkpoint(checkpoint_path, state.state_dict(progress, self.history, self.train_seconds, self.train_images_seen))

        # Moved once here, not copied to the device by every epoch's validation.
        val_images, val_labels = data.val_images.to(self.device), data.val_labels.to(self.device)
        try:
            with stop_on_signals() as stop, thawed_on_exit() as frozen:
                while progress.epoch <= self.epochs:
                    frozen += self.freeze_stopped(optimizer, epochs_done=progress.epoch - 1)
                    record = self.train_epoch(batches, optimizer, schedule, progress, stop, save, checkpoint_every)
                    # Test-time augmentation (up to 6 views) only in the last epoch's validation, like the test.
                    validation = self.evaluate(val_images, val_labels, tta=cfg.tta and progress.epoch == self.epochs)
                    if not math.isfinite(validation.loss):
                        raise VitlabError(f"validation loss became {validation.loss} in epoch {record['epoch']} (the weights are not finite); "
                                          "lower --lr or --weight_decay, or set --grad_clip 1.0")
                    record.update(val_loss=validation.loss, val_acc=validation.accuracy)
                    self.history.append(record)
                    progress = Progress(epoch=progress.epoch + 1)
                    save()
                    if self.history_file is not None and self.distributed.is_main:
                        from vitlab.io import append_jsonl

                        append_jsonl(self.history_file, record)
                    for hook in self.epoch_end_hooks:
                        hook(record)
                    if cfg.progress and self.distributed.is_main:
                        tqdm.write(
                            f"epoch {record['epoch']}/{self.epochs}: train loss {record['train_loss']:.4f} acc {record['train_acc']:.2f}% | "
                            f"val loss {record['val_loss']:.4f} acc {record['val_acc']:.2f}% | {record['images_per_second']:.0f} img/s"
                        )
            if self.ema is not None:  # the run's final weights are the average: what is saved and tested
                self.ema.copy_to_model()
                self.ema = None
        finally:
            release_buffers()  # the attention weights and block temporaries kept from step to step (also after an error)
        return self.history

    def train_step(self, images: torch.Tensor, labels: torch.Tensor, optimizer: torch.optim.Optimizer,
                   partner_labels: torch.Tensor | None = None, weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimisation step on a batch; returns the detached loss () and logits (B, classes).

        For a MixUp/CutMix batch, `weight` of each image is `labels`' class and the rest `partner_labels`'.
        With --micro_batch_size, the batch goes forward and backward in parts whose gradients add up to the batch's.
        """
        optimizer.zero_grad(set_to_none=True)
        size = self.config.micro_batch_size or len(labels)
        parts = [slice(start, start + size) for start in range(0, len(labels), size)]
        losses, logits = [], []
        for index, part in enumerate(parts):
            last = index == len(parts) - 1
            with contextlib.nullcontext() if last else no_gradient_sync(self.train_forward):
                loss, part_logits = self.loss(images[part], labels[part], None if partner_labels is None else partner_labels[part], weight)
                loss = loss * (len(part_logits) / len(labels))  # the batch's loss: the parts' mean losses weighted by size
                loss.backward()
            losses.append(loss.detach())
            logits.append(part_logits.detach())
        if self.config.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        optimizer.step()
        return torch.stack(losses).sum(), torch.cat(logits)

    def loss(self, images: torch.Tensor, labels: torch.Tensor, partner_labels: torch.Tensor | None,
             weight: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean training loss () over `images` and their logits (B, classes)."""
        with autocast(self.device, self.precision):
            logits = self.train_forward(images)  # (B, classes)
        smoothing = self.config.label_smoothing
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=smoothing)
        if partner_labels is not None and weight < 1.0:
            loss = weight * loss + (1.0 - weight) * F.cross_entropy(logits.float(), partner_labels, label_smoothing=smoothing)
        return loss, logits

    def freeze_stopped(self, optimizer: torch.optim.Optimizer, epochs_done: int) -> list[nn.Parameter]:
        """Stop computing gradients for parameters whose learning rate has reached its final 0 (a group's `stop_epoch`,
        e.g. cnn-fast's whitening bias): backward then skips what only they need. Returns the parameters frozen now.
        Not under DDP, whose gradient hooks expect the parameters it was built with."""
        if self.distributed.enabled:
            return []
        newly = [p for p in stopped_parameters(optimizer, epochs_done, self.epochs) if p.requires_grad]
        for parameter in newly:
            parameter.requires_grad_(False)
        return newly

    def train_epoch(self, batches: DeviceBatches, optimizer, schedule, progress: Progress, stop, save, checkpoint_every: int) -> dict:
        """Run the rest of the epoch in `progress` (from its step on), updating `progress` as it goes."""
        cfg, epoch = self.config, progress.epoch
        self.model.train()
        if progress.order is None:
            progress.order = batches.new_order()
        # `progress` holds the sums over all processes (what rank 0 checkpoints); each process accumulates its own
        # part, starting from those sums on rank 0 and from zero elsewhere, so a resumed epoch counts everything once.
        carried = self.distributed.is_main
        loss_sum = torch.tensor(progress.loss_sum if carried else 0.0, device=self.device)
        correct = torch.tensor(progress.correct if carried else 0, device=self.device, dtype=torch.long)
        seen = progress.seen if carried else 0
        bar = tqdm(total=len(batches), initial=progress.step, desc=f"epoch {epoch}/{self.epochs}", unit="step",
                   disable=not cfg.progress or not self.distributed.is_main, leave=False)
        start, seconds_before = time.perf_counter(), progress.seconds

        def sync_progress() -> tuple[float, float, int]:
            """Sum the processes' running sums into `progress`; returns (loss sum, correct, seen) over all ranks."""
            progress.seconds = seconds_before + time.perf_counter() - start
            totals = all_reduce_sum(torch.stack([loss_sum.double(), correct.double(), torch.tensor(float(seen), dtype=torch.float64,
                                                                                                   device=self.device)]),
                                    self.distributed).tolist()
            if not math.isfinite(totals[0]):  # the last good checkpoint stays untouched
                raise VitlabError(f"training loss became {totals[0] / totals[2]} in epoch {epoch}; lower --lr or set --grad_clip 1.0")
            progress.loss_sum, progress.correct, progress.seen = totals[0], int(totals[1]), int(totals[2])
            return totals[0], totals[1], int(totals[2])

        for step in range(progress.step, len(batches)):
            images, labels = batches.batch(step, progress.order, epoch)
            mixed = mix_batch(images, labels, cfg.mixup, cfg.cutmix, batches.host_generator)
            loss, logits = self.train_step(mixed.images, labels, optimizer, mixed.partner_labels, mixed.weight)
            schedule.step()
            if self.ema is not None:
                self.ema.update()
            loss_sum += loss * len(labels)
            correct += (logits.argmax(dim=1) == mixed.dominant_labels).sum()
            seen += len(labels)
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

    def evaluate(self, images: torch.Tensor, labels: torch.Tensor, tta: bool | None = None) -> Evaluation:
        """Cross-entropy loss and accuracy on uint8 images, in order (see `vitlab.train.evaluate.evaluate`);
        with test-time augmentation if `tta` (default: the config's)."""
        tta = self.config.tta if tta is None else tta
        with self.ema.swapped_in() if self.ema is not None else contextlib.nullcontext():
            return evaluate(self.model, images, labels, batch_size=self.config.eval_batch_size, precision=self.precision,
                            tta=tta, tta_shift=self.config.tta_shift, pad_mode=self.data_config.pad_mode,
                            memory_format=self.memory_format, forward=self.forward)
