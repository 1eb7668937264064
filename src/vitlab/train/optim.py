"""The optimiser and its schedule: parameter groups (what gets weight decay), AdamW or SGD, and the
per-step learning-rate schedule: linear warmup, then cosine (Loshchilov & Hutter 2017) or linear decay."""

from __future__ import annotations

import math

import torch
from torch import nn

from vitlab.config import TrainConfig
from vitlab.errors import VitlabError
from vitlab.train.muon import MuonAdamW, MuonSGD

# Parameters that get no weight decay besides biases and norm scales (all 1-D): decaying the
# CLS token, the position table or register tokens towards zero only erases what they encode.
NO_DECAY_NAMES = ("cls_token", "position_embedding", "register_tokens")
# SyncBatchNorm is not a BatchNorm2d subclass: both must count as normalisation layers.
NORM_LAYERS = (nn.BatchNorm2d, nn.SyncBatchNorm, nn.LayerNorm)


def parameter_groups(model: nn.Module, config: TrainConfig) -> list[dict]:
    """Weights get weight decay; biases, norms, CLS token and positions do not (AdamW). For SGD
    (airbench's recipe) everything decays, and normalisation biases can get a larger learning rate.
    For Muon (airbench94_muon's recipe) see `muon_parameter_groups`. With whitening_bias_epochs, the model's
    whitening bias leaves its group for one of its own that stops after that many epochs (`make_schedule`)."""
    if config.optimizer == "muon":
        groups = muon_parameter_groups(model, config)
    elif config.optimizer == "muon-adamw":
        groups = muon_adamw_parameter_groups(model, config)
    else:
        groups = plain_parameter_groups(model, config)
    if config.whitening_bias_epochs > 0:
        groups = split_whitening_bias(model, groups, config.whitening_bias_epochs)
    return groups


def split_whitening_bias(model: nn.Module, groups: list[dict], epochs: float) -> list[dict]:
    """The groups with the whitening bias in a last group of its own, with its former group's settings and
    `stop_epoch` = epochs."""
    whitening = getattr(model, "whiten", None)
    bias = getattr(whitening, "bias", None)
    if not isinstance(whitening, nn.Conv2d) or bias is None or not bias.requires_grad:
        raise VitlabError(f"--whitening_bias_epochs applies to a model with a whitening layer (aircnn), not {type(model).__name__}; "
                          "drop the flag")
    home = next(group for group in groups if any(p is bias for p in group["params"]))
    rest = [{**group, "params": [p for p in group["params"] if p is not bias]} for group in groups]
    own = {**{key: value for key, value in home.items() if key != "params"}, "params": [bias], "stop_epoch": epochs}
    return [group for group in rest if group["params"]] + [own]


def plain_parameter_groups(model: nn.Module, config: TrainConfig) -> list[dict]:
    """AdamW's or SGD's groups (see `parameter_groups`)."""
    decay, no_decay, norm_biases = [], [], []
    norm_bias_ids = {id(m.bias) for m in model.modules() if isinstance(m, NORM_LAYERS) and m.bias is not None}
    # timm models name their own (cls_token, pos_embed, ...): TimmModel.no_weight_decay() passes them on.
    named_no_decay = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if config.optimizer == "sgd":
            (norm_biases if id(parameter) in norm_bias_ids else decay).append(parameter)
        elif parameter.ndim < 2 or name in named_no_decay or any(key in name for key in NO_DECAY_NAMES):
            no_decay.append(parameter)
        else:
            decay.append(parameter)
    scale = config.norm_bias_lr_scale
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0},
              {"params": norm_biases, "weight_decay": config.weight_decay / scale, "lr": config.lr * scale}]
    return [group for group in groups if group["params"]]


def declared_trainable(model: nn.Module, method: str, refusal: str) -> list[nn.Parameter]:
    """The trainable parameters `model.<method>()` lists; `refusal` as the error if there are none."""
    declared = getattr(model, method)() if hasattr(model, method) else []
    trainable = [p for p in declared if p.requires_grad]
    if not trainable:
        raise VitlabError(refusal)
    return trainable


def muon_parameter_groups(model: nn.Module, config: TrainConfig) -> list[dict]:
    """SGD at `lr` for the rest, biases at `lr` × norm_bias_lr_scale, and last (so that group 0, what the logs
    show, is at `lr`) the Muon group: the filters the model declares scale-invariant (a BatchNorm follows them)."""
    filters = declared_trainable(model, "scale_invariant_filters", "--optimizer muon moves convolution filters that a BatchNorm "
                                 f"follows, and {type(model).__name__} declares none (aircnn and cnn do); use --optimizer adamw or sgd")
    filter_ids = {id(p) for p in filters}
    others = [p for p in model.parameters() if p.requires_grad and id(p) not in filter_ids]
    scale = config.norm_bias_lr_scale
    groups = [{"params": [p for p in others if p.ndim != 1], "weight_decay": config.weight_decay},
              {"params": [p for p in others if p.ndim == 1], "weight_decay": config.weight_decay / scale, "lr": config.lr * scale},
              {"params": filters, "orthogonalize": True, "lr": config.muon_lr, "momentum": config.muon_momentum, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


def muon_adamw_parameter_groups(model: nn.Module, config: TrainConfig) -> list[dict]:
    """AdamW's groups for everything but the matrices the model declares hidden (`hidden_matrices`), and last a
    Muon group of those, with AdamW's weight decay."""
    matrices = declared_trainable(model, "hidden_matrices", "--optimizer muon-adamw moves the hidden weight matrices of a ViT, and "
                                  f"{type(model).__name__} declares none; use --optimizer adamw (or muon for a CNN with BatchNorm)")
    matrix_ids = {id(p) for p in matrices}
    groups = [{**group, "params": [p for p in group["params"] if id(p) not in matrix_ids]} for group in plain_parameter_groups(model, config)]
    return [group for group in groups if group["params"]] + [
        {"params": matrices, "orthogonalize": True, "momentum": config.muon_momentum, "weight_decay": config.weight_decay}]


def make_optimizer(model: nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    groups = parameter_groups(model, config)
    if config.optimizer == "muon":
        return MuonSGD(groups, lr=config.lr, momentum=config.momentum)
    if config.optimizer == "muon-adamw":
        return MuonAdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2), momentum=config.muon_momentum)
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=config.momentum > 0)
    fused = {"fused": True} if fused_adamw_supported(device) else {}
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2), **fused)


def fused_adamw_supported(device: torch.device) -> bool:
    """Fused AdamW (one kernel for all parameters) on CUDA, and on the CPU from torch 2.4, where it took a quarter of
    the foreach version's time for the ViTs' optimiser steps (docs/performance.md)."""
    return device.type == "cuda" or (device.type == "cpu" and torch.__version__ >= (2, 4))


def make_schedule(optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int, epochs: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step multiplier of each group's peak learning rate over `epochs` epochs; a group with a `stop_epoch`
    shorter than the run runs the same schedule (warmup included) squeezed into its first `stop_epoch` epochs, then
    stays at 0. (Its parameters still get gradients, which count in --grad_clip's norm, until the epoch boundary after
    `stop_epoch`, where `stopped_parameters` lets the Runner freeze them, as airbench does.)"""
    multiplier = SCHEDULES[config.schedule]

    def group_schedule(epochs_of_group: float, floor: float):
        total_steps = max(1, round(steps_per_epoch * epochs_of_group))
        # Clamped first: a warmup longer than the run is the whole run (and a huge one would overflow the product).
        warmup_steps = min(round(min(config.warmup_epochs, epochs) * steps_per_epoch * epochs_of_group / epochs), total_steps)
        return lambda step: multiplier(step, warmup_steps, total_steps, floor) if step < total_steps else floor

    schedules = [group_schedule(group["stop_epoch"], 0.0) if group.get("stop_epoch", epochs) < epochs else group_schedule(epochs, config.min_lr_ratio)
                 for group in optimizer.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedules)


def stopped_parameters(optimizer: torch.optim.Optimizer, epochs_done: float, epochs: int) -> list[torch.nn.Parameter]:
    """The parameters of groups whose `stop_epoch` (see `make_schedule`) lies within the first `epochs_done` of the
    run's `epochs`: their learning rate is 0 from there on, so they need no gradients."""
    return [parameter for group in optimizer.param_groups if group.get("stop_epoch", epochs) < epochs and group["stop_epoch"] <= epochs_done
            for parameter in group["params"]]


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """Multiplier of the peak learning rate at `step` (0-based)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def warmup_linear(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """Linear warmup then linear decay to `min_ratio`: the triangle schedule of airbench."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 1.0 - (1.0 - min_ratio) * min(1.0, progress)


SCHEDULES = {"cosine": warmup_cosine, "linear": warmup_linear}
