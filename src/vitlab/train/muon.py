"""Muon for convolution filters, SGD-Nesterov for everything else: one optimiser, one schedule.

Muon (Jordan et al. 2024, "Muon: an optimizer for hidden layers in neural networks"; used for the
convolution filters of airbench94_muon, 94% on CIFAR-10 in 8 epochs) keeps a Nesterov momentum of the
gradient like SGD, but replaces each filter bank's update by the nearest semi-orthogonal matrix (U Vᵀ of
its SVD), approximated with a few Newton–Schulz iterations: every direction of the update moves by about
the same amount, however unequal the gradient's singular values are.

Before each update a filter bank of shape (out, in, k, k) is rescaled to Frobenius norm √out, as
airbench94_muon does: each filter is followed by BatchNorm, which makes the layer blind to that scale, so
the learning rate is an angle rather than a distance. That is why `--optimizer muon` is meant for
convolutional networks with BatchNorm: it moves only the filters a model declares scale-invariant
(`VitlabModel.scale_invariant_filters`: `aircnn` and `cnn` do).

Groups marked `orthogonalize=True` get Muon (no weight decay); all other groups get PyTorch's
SGD-Nesterov update (same formula: buffer ← m·buffer + g + wd·p, step g + wd·p + m·buffer).
"""

from __future__ import annotations

import math

import torch

# Quintic Newton–Schulz coefficients from the Muon write-up: they drive singular values in (0, 1] towards
# ~1 in few steps (not exactly to 1, which does not matter for an update direction).
NEWTON_SCHULZ_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def orthogonalize(matrix: torch.Tensor, steps: int = 3, eps: float = 1e-7) -> torch.Tensor:
    """Approximately U Vᵀ for `matrix` = U S Vᵀ (rows, cols), in bf16 on CPUs and CUDA (fp32 elsewhere, e.g. MPS);
    returned in `matrix`'s dtype."""
    a, b, c = NEWTON_SCHULZ_COEFFICIENTS
    x = matrix.to(torch.bfloat16 if matrix.device.type in ("cpu", "cuda") else torch.float32)
    x = x / (x.norm() + eps)  # every singular value now ≤ 1
    wide = x.shape[0] <= x.shape[1]
    if not wide:
        x = x.T  # iterate on the side with the smaller Gram matrix
    for _ in range(steps):
        gram = x @ x.T  # (r, r), r = min(rows, cols)
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x if wide else x.T).to(matrix.dtype)


class MuonSGD(torch.optim.Optimizer):
    """Args (per group, defaults from the constructor):
        lr: learning rate (for Muon groups an angle per step; see the module docstring).
        momentum: Nesterov momentum.
        weight_decay: L2 decay added to the gradient (SGD groups only).
        orthogonalize: True for Muon groups (4-D filter banks).
        newton_schulz_steps: iterations of `orthogonalize`.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, newton_schulz_steps: int = 3) -> None:
        if lr <= 0 or not 0 <= momentum < 1 or weight_decay < 0:
            raise ValueError(f"MuonSGD needs lr > 0, momentum in [0, 1), weight_decay >= 0; got {lr}, {momentum}, {weight_decay}")
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "orthogonalize": False,
                    "newton_schulz_steps": newton_schulz_steps}
        super().__init__(params, defaults)
        for group in self.param_groups:
            if group["orthogonalize"] and any(p.ndim < 2 for p in group["params"]):
                raise ValueError("Muon groups hold filter banks or matrices (>= 2-D parameters) only")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            for parameter in group["params"]:
                if parameter.grad is None:
                    continue
                gradient = parameter.grad
                if group["weight_decay"] and not group["orthogonalize"]:
                    gradient = gradient.add(parameter, alpha=group["weight_decay"])
                state = self.state[parameter]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(parameter)
                buffer = state["momentum_buffer"]
                buffer.mul_(momentum).add_(gradient)
                update = gradient.add(buffer, alpha=momentum)  # Nesterov
                if group["orthogonalize"]:
                    parameter.mul_(math.sqrt(parameter.shape[0]) / parameter.norm().clamp_min(1e-12))
                    update = orthogonalize(update.reshape(len(update), -1), group["newton_schulz_steps"]).view_as(parameter)
                parameter.add_(update, alpha=-lr)
        return loss
