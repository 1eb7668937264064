"""Run settings as dataclasses. The command line is derived from these fields (see cli.py), and the
whole `RunConfig` is saved as `config.json` in every run folder, so a field added here is at once a
flag, a saved value and a loaded value.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from vitlab.errors import VitlabError

PRECISIONS = ("auto", "fp32", "bf16")
OPTIMIZERS = ("adamw", "sgd", "muon", "muon-adamw")
SCHEDULES = ("cosine", "linear")
DEVICES = ("auto", "cpu", "cuda", "mps")
PAD_MODES = ("zeros", "reflect")


@dataclass
class DataConfig:
    """Where the data comes from and how it is split and augmented.

    Args:
        dataset: cifar10, cifar100, or folder:PATH (PATH/train/<class>/images, optional val/ and test/; see vitlab.datasets).
        image_size: side the images of a folder dataset are resized to, once (default 32); CIFAR images are 32.
        data_dir: folder holding CIFAR-10 or CIFAR-100 (then $VITLAB_DATA, then ./data are tried).
        download: download CIFAR-10 when it is not found.
        val_fraction: share of the training set held out for validation (the seeds' 80/20).
        split_seed: seed of the train/validation split (fixed, so all runs validate on the same images).
        subset: use only this many of the 50,000 training images, before the train/validation split (both shrink).
        train_size: train on only this many images of the training split; the validation split stays whole
            (for learning curves: each smaller training set is part of every larger one).
        test_subset: test on only the first this-many test images.
        crop_padding: random-crop padding in pixels (0 turns cropping off).
        pad_mode: what fills the border of random crops and of TTA's shifted views: zeros (black in training, as
            torchvision's RandomCrop; the mean colour in TTA) or reflect (the image mirrored at its edge, as airbench).
        flip: random horizontal flips.
        alternating_flip: flip each image in every other epoch instead of at random (airbench: each image is seen
            both ways every two epochs; which way first is random per image).
        train_on_validation: also train on the validation images (the untouched test set is still what is
            reported; validation accuracy is then measured on training images and says so).
        trivial_augment: TrivialAugment (Müller & Hutter 2021): one random operation (geometric or colour) at a
            random magnitude per training image, on the device.
        random_erasing: probability of erasing a random rectangle of each training image (Zhong et al. 2020).
    """

    dataset: str = "cifar10"
    image_size: int | None = None
    data_dir: str | None = None
    download: bool = True
    val_fraction: float = 0.2
    split_seed: int = 0
    subset: int | None = None
    train_size: int | None = None
    test_subset: int | None = None
    crop_padding: int = 4
    pad_mode: str = "zeros"
    flip: bool = True
    alternating_flip: bool = False
    train_on_validation: bool = False
    trivial_augment: bool = False
    random_erasing: float = 0.0

    def __post_init__(self) -> None:
        check_finite_numbers(self)
        for name in ("subset", "train_size", "test_subset"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise VitlabError(f"{name} must be at least 1, got {value}")
        if not 0 <= self.split_seed < 2**63:
            raise VitlabError(f"split_seed must be between 0 and 2**63 - 1, got {self.split_seed}")
        if not 0.0 < self.val_fraction < 1.0:
            raise VitlabError(f"val_fraction must be between 0 and 1 (exclusive), got {self.val_fraction}")
        if self.dataset not in ("cifar10", "cifar100") and not (self.dataset.startswith("folder:") and len(self.dataset) > 7):
            raise VitlabError(f"dataset must be cifar10, cifar100 or folder:PATH, got '{self.dataset}'")
        if self.image_size is not None:
            if not self.dataset.startswith("folder:"):
                raise VitlabError(f"image_size applies to folder datasets only ({self.dataset} images are 32×32); drop --image_size")
            if not 8 <= self.image_size <= 512:
                raise VitlabError(f"image_size must be between 8 and 512, got {self.image_size}")
        if not 0.0 <= self.random_erasing <= 1.0:
            raise VitlabError(f"random_erasing is a probability in [0, 1], got {self.random_erasing}")
        if not 0 <= self.crop_padding <= 16:
            raise VitlabError(f"crop_padding must be between 0 and 16 pixels, got {self.crop_padding}")
        if self.pad_mode not in PAD_MODES:
            raise VitlabError(f"pad_mode must be one of {', '.join(PAD_MODES)}, got '{self.pad_mode}'")
        if self.pad_mode == "reflect" and self.image_size is not None and self.crop_padding >= self.image_size:
            raise VitlabError(f"pad_mode reflect mirrors the image at its edge, so crop_padding ({self.crop_padding}) must be smaller "
                              f"than image_size ({self.image_size}); lower --crop_padding")


@dataclass
class TrainConfig:
    """The optimisation recipe: by default AdamW with linear warmup then cosine decay to zero, per step.

    Args:
        optimizer: adamw, sgd (Nesterov momentum), or muon: Muon for the convolution filters (orthogonalised
            momentum, filters kept at a fixed norm; for CNNs with BatchNorm) and SGD-Nesterov at `lr` for the
            rest, every bias at `lr` × norm_bias_lr_scale (vitlab.train.muon); or muon-adamw: Muon for a ViT's
            hidden matrices (attention, MLP, conv-group tokenizer filters; decayed by weight_decay) and AdamW for the
            rest (decayed as AdamW's groups are), all at `lr` (the Muon update scaled to AdamW's size, as Moonlight
            does; momentum muon_momentum; --muon_lr and --momentum do not apply).
        epochs: passes over the training split (with images_budget: the most passes).
        images_budget: train on this many images in all, whatever the size of the training split: epochs =
            ceil(images_budget / training images), at most --epochs (for learning curves with equal compute).
        batch_size: images per step.
        micro_batch_size: split each step's batch into micro-batches of this many images, each forward and backward
            on its own, then one optimiser step on their summed gradients (gradient accumulation: the step is the
            same, but BatchNorm normalises over each micro-batch, "ghost batch norm"); 0 = the whole batch at once.
            Also a speed setting on the CPU, where cnn-fast's batch of 2000 stepped faster in micro-batches of 500.
        lr: peak learning rate (reached after warmup).
        weight_decay: AdamW decoupled weight decay (not applied to biases, norms, tokens, positions).
        warmup_epochs: epochs of linear warmup from 0 to lr (fractions allowed).
        schedule: after warmup, cosine or linear decay to min_lr_ratio × lr.
        min_lr_ratio: final learning rate as a share of lr.
        momentum: SGD's Nesterov momentum.
        muon_lr: with optimizer muon, the filters' learning rate (an angle per step: the filters keep their norm).
        muon_momentum: with optimizer muon or muon-adamw, the Nesterov momentum of the Muon groups; by default 0.6
            for muon (airbench94_muon's) and 0.95 for muon-adamw (Muon's and Moonlight's).
        norm_bias_lr_scale: learning-rate multiplier for normalisation biases (airbench uses 64), with
            their weight decay divided by the same factor so the decay per step is unchanged.
        whitening_bias_epochs: aircnn: the frozen whitening layer's bias trains only this many epochs, its
            learning rate on the run's schedule squeezed into them and 0 after (airbench94: 3); 0 = the whole run.
            From the first epoch after it the bias is frozen (no gradient), which spares the backward pass through
            the first convolution's input.
        beta1: AdamW first-moment decay.
        beta2: AdamW second-moment decay.
        label_smoothing: cross-entropy label smoothing.
        mixup: MixUp's Beta(alpha, alpha) parameter: blend each training image with another (0 = off).
        cutmix: CutMix's Beta(alpha, alpha) parameter: paste a box of another image (0 = off); with both
            on, each batch uses one of the two.
        grad_clip: clip the global gradient norm to this (0 turns clipping off).
        seed: seeds weights, batch order and augmentation.
        device: auto (CUDA, then Apple MPS, then CPU), cpu, cuda or mps.
        precision: fp32, bf16 (autocast) or auto (bf16 where the device runs it fast).
        eval_batch_size: images per evaluation step.
        tta: test (and validate after the last epoch) on each image and its mirror image, averaging the logits;
            earlier epochs validate on the plain images, which costs one view instead of up to six.
        tta_shift: with tta, also average the views shifted by this many pixels (both directions, each mirrored;
            airbench's multi-crop TTA: the two untranslated views weigh 1/2, the four shifted ones 1/2).
        ema_decay: keep an exponential moving average of the weights (updated every step) and validate and test
            with it (0 = off); e.g. 0.99.
        checkpoint_every: also checkpoint every this many steps (the run folder always gets one per epoch).
        channels_last: store convolutional models and their batches channels-last (NHWC).
        compile: run the model through torch.compile (off by default: about a minute of compiling; on the CPU a compiled
            model runs PyTorch's operators instead of vitlab's C kernels, and with them eager steps were faster for
            every model measured but vit-pure, where the two were within a few per cent; docs/performance.md).
        cpu_kernels: on the CPU, use vitlab's C kernels where they apply (dropout in one pass; with AVX-512 the
            softmax of attention weights, with AVX-512 BF16 self-attention of up to 272 tokens; vitlab/kernels);
            false: PyTorch's operators only (the same distributions and formulas, other random draws and roundings).
            Without a C compiler it is always false. It applies to training; evaluate, predict and the inspection
            commands use the kernels wherever they can run.
        progress: show a live progress bar.
        tensorboard: also log scalars (and a ViT's attention rollout images) to RUN_DIR/tensorboard.
        gif: save per-epoch snapshots of fixed validation images and write RUN_DIR/training.gif.
    """

    epochs: int = 10
    images_budget: int | None = None
    optimizer: str = "adamw"
    batch_size: int = 128
    micro_batch_size: int = 0
    lr: float = 3e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    schedule: str = "cosine"
    min_lr_ratio: float = 0.0
    momentum: float = 0.9
    muon_lr: float = 0.24
    muon_momentum: float | None = None
    norm_bias_lr_scale: float = 1.0
    whitening_bias_epochs: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    label_smoothing: float = 0.1
    mixup: float = 0.0
    cutmix: float = 0.0
    grad_clip: float = 0.0
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    eval_batch_size: int = 500
    tta: bool = False
    tta_shift: int = 0
    ema_decay: float = 0.0
    checkpoint_every: int = 0
    channels_last: bool = True
    compile: bool = False
    cpu_kernels: bool = True
    progress: bool = True
    tensorboard: bool = False
    gif: bool = False

    def __post_init__(self) -> None:
        check_finite_numbers(self)
        if self.muon_momentum is None:
            self.muon_momentum = 0.95 if self.optimizer == "muon-adamw" else 0.6
        checks = [
            (0 <= self.seed < 2**63, f"seed must be between 0 and 2**63 - 1, got {self.seed}"),
            (self.epochs >= 1, f"epochs must be at least 1, got {self.epochs}"),
            (self.images_budget is None or self.images_budget >= 1, f"images_budget must be at least 1, got {self.images_budget}"),
            (self.batch_size >= 1, f"batch_size must be at least 1, got {self.batch_size}"),
            (self.micro_batch_size >= 0, f"micro_batch_size must be >= 0 (0 = the whole batch at once), got {self.micro_batch_size}"),
            (self.eval_batch_size >= 1, f"eval_batch_size must be at least 1, got {self.eval_batch_size}"),
            (self.lr > 0, f"lr must be positive, got {self.lr}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (self.warmup_epochs >= 0, f"warmup_epochs must be >= 0, got {self.warmup_epochs}"),
            (0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}"),
            (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, f"beta1 and beta2 must be in [0, 1), got {self.beta1}, {self.beta2}"),
            (0 <= self.label_smoothing < 1, f"label_smoothing must be in [0, 1), got {self.label_smoothing}"),
            (0 <= self.tta_shift <= 4, f"tta_shift must be between 0 and 4 pixels, got {self.tta_shift}"),
            (0.0 <= self.ema_decay < 1.0, f"ema_decay must be in [0, 1) (0 = off), got {self.ema_decay}"),
            (self.checkpoint_every >= 0, f"checkpoint_every must be >= 0 (0 = only at epoch ends), got {self.checkpoint_every}"),
            (self.mixup >= 0 and self.cutmix >= 0, f"mixup and cutmix must be >= 0 (0 = off), got {self.mixup}, {self.cutmix}"),
            (self.grad_clip >= 0, f"grad_clip must be >= 0 (0 = off), got {self.grad_clip}"),
            (self.optimizer in OPTIMIZERS, f"optimizer must be one of {', '.join(OPTIMIZERS)}, got '{self.optimizer}'"),
            (self.schedule in SCHEDULES, f"schedule must be one of {', '.join(SCHEDULES)}, got '{self.schedule}'"),
            (0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum}"),
            (self.muon_lr > 0, f"muon_lr must be positive, got {self.muon_lr}"),
            (not (self.optimizer == "muon" and self.ema_decay > 0),
             "--ema_decay does not combine with --optimizer muon (an average of filters Muon keeps at a fixed norm is "
             "shorter than each, which BatchNorm's running statistics do not match); drop one of them"),
            (0 <= self.muon_momentum < 1, f"muon_momentum must be in [0, 1), got {self.muon_momentum}"),
            (self.norm_bias_lr_scale > 0, f"norm_bias_lr_scale must be positive, got {self.norm_bias_lr_scale}"),
            (self.whitening_bias_epochs >= 0, f"whitening_bias_epochs must be >= 0 (0 = the whole run), got {self.whitening_bias_epochs}"),
            (self.device in DEVICES, f"device must be one of {', '.join(DEVICES)}, got '{self.device}'"),
            (self.precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}, got '{self.precision}'"),
        ]
        for ok, message in checks:
            if not ok:
                raise VitlabError(message)


def check_finite_numbers(config) -> None:
    """Every float setting of a config must be a finite number (inf or nan would only fail mid-run)."""
    for config_field in dataclasses.fields(config):
        value = getattr(config, config_field.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise VitlabError(f"{config_field.name} must be finite, got {value}")


def epochs_for(config: TrainConfig, train_images: int) -> int:
    """The epochs a run trains: --epochs, or with --images_budget the passes that budget buys (at most --epochs)."""
    if config.images_budget is None:
        return config.epochs
    return max(1, min(config.epochs, math.ceil(config.images_budget / max(train_images, 1))))


@dataclass
class RunConfig:
    """Everything that defines a run: the model's own config (its class names the model), the data and the recipe.

    Example:
        RunConfig(model=ViTConfig(patch_size=4), train=TrainConfig(epochs=20))
    """

    model: Any  # a model config dataclass: ViTConfig, CNNConfig, ... (see vitlab.models.MODELS)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    preset: str | None = None

    @property
    def model_name(self) -> str:
        from vitlab.models import model_name_of

        return model_name_of(self.model)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model_name, "model_config": dataclasses.asdict(self.model), "data": dataclasses.asdict(self.data),
                "train": dataclasses.asdict(self.train), "preset": self.preset}

    @classmethod
    def from_dict(cls, values: Any, source: Any = "config.json") -> "RunConfig":
        from vitlab.models import model_class

        try:
            if not isinstance(values, dict):
                raise TypeError(f"expected an object, got {type(values).__name__}")
            model_config_class = model_class(values["model"]).config_class
            return cls(model=model_config_class(**dict(values["model_config"])), data=DataConfig(**values.get("data", {})),
                       train=TrainConfig(**values.get("train", {})), preset=values.get("preset"))
        except (KeyError, TypeError, ValueError) as error:
            raise VitlabError(f"{source} is not a vitlab run config ({str(error)[:150]}); it is corrupt or from another version") from None


def setting_owner(model_name: str, name: str) -> str:
    """Which config a setting name belongs to for this model: 'model', 'data' or 'train'; raises for
    settings that do not exist, that only other models have, or that the data decides."""
    from vitlab.models import model_class, model_setting_names

    own = {f.name: f for f in dataclasses.fields(model_class(model_name).config_class)}
    if name in own and not own[name].metadata.get("from_data"):
        return "model"
    if name in DATA_FIELDS:
        return "data"
    if name in TRAIN_FIELDS:
        return "train"
    if name in own:
        raise VitlabError(f"{name} is set by the dataset, not by hand; drop --{name}")
    if name in model_setting_names():
        raise VitlabError(f"--{name} does not apply to model '{model_name}'; its settings are "
                          f"{', '.join(sorted(n for n, f in own.items() if not f.metadata.get('from_data')))}")
    raise VitlabError(f"unknown setting '{name}'; see 'vitlab train --help' for the settings")


def route_settings(model_name: str, settings: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Split flat settings by name into {'model': ..., 'data': ..., 'train': ...}: the one place that routes them."""
    routed: dict[str, dict[str, Any]] = {"model": {}, "data": {}, "train": {}}
    for name, value in settings.items():
        routed[setting_owner(model_name, name)][name] = value
    return routed


DATA_FIELDS = frozenset(f.name for f in dataclasses.fields(DataConfig))
TRAIN_FIELDS = frozenset(f.name for f in dataclasses.fields(TrainConfig))


def parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got '{text}'")


def parse_int_tuple(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 64,128, got '{text}'") from None


def parse_scalar(text: str) -> int | float | bool | str:
    """'32' → 32, '0.1' → 0.1, 'true' → True, anything else stays text."""
    for parse in (int, float, parse_bool):
        try:
            return parse(text)
        except (ValueError, argparse.ArgumentTypeError):
            pass
    return text


def parse_keyword_arguments(text: str) -> dict[str, int | float | bool | str]:
    """'img_size=32,patch_size=4' → {'img_size': 32, 'patch_size': 4}; '' → {}."""
    values: dict[str, int | float | bool | str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, equals, value = item.partition("=")
        if not equals or not key.strip().isidentifier():
            raise argparse.ArgumentTypeError(f"expected NAME=VALUE pairs separated by commas such as img_size=32,patch_size=4, got '{text}'")
        values[key.strip()] = parse_scalar(value.strip())
    return values


def flag_parser(annotation: Any):
    """Text → value for a resolved dataclass field annotation (also argparse's `type=`)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next(arg for arg in typing.get_args(annotation) if arg is not type(None))
    if annotation is bool:
        return parse_bool
    if typing.get_origin(annotation) is tuple:
        return parse_int_tuple
    if typing.get_origin(annotation) is dict:
        return parse_keyword_arguments
    return annotation


def parse_field_value(cls: type, name: str, text: str) -> Any:
    """The value of field `name` of dataclass `cls` written as `text` ('4', 'true', 'sincos', ...)."""
    annotation = typing.get_type_hints(cls)[name]
    try:
        return flag_parser(annotation)(text)
    except (argparse.ArgumentTypeError, ValueError, TypeError) as error:
        raise VitlabError(f"bad value '{text}' for {name} ({error})") from None
