"""Muon for convolution filters with SGD-Nesterov for everything else (`MuonSGD`, airbench94_muon's
recipe), or Muon for a transformer's hidden matrices with AdamW for everything else (`MuonAdamW`).

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

In `MuonSGD`, groups marked `orthogonalize=True` get Muon (no weight decay); all other groups get PyTorch's
SGD-Nesterov update (same formula: buffer ← m·buffer + g + wd·p, step g + wd·p + m·buffer).

`MuonAdamW` is the transformer recipe of modded-nanogpt and Moonlight (Liu et al. 2025, "Muon is scalable
for LLM training"): Muon for the weight matrices inside the network (attention, MLP, conv filters of a conv
tokenizer), AdamW for embeddings, norms, biases and the head. Its Muon update is scaled by
0.2·√max(rows, cols), which gives it about the RMS of an AdamW update, so both kinds of group share one
learning rate and one decoupled weight decay; the matrices keep their norm free (no rescaling).
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


class MuonOptimizer(torch.optim.Optimizer):
    """What both Muon optimisers share: Muon groups (`orthogonalize=True`) hold only matrices or filter banks, and
    `step` evaluates the closure, then `update(parameter, group)` moves each parameter that has a gradient."""

    def __init__(self, params, defaults: dict) -> None:
        super().__init__(params, {**defaults, "orthogonalize": False})
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
            for parameter in group["params"]:
                if parameter.grad is not None:
                    self.update(parameter, group)
        return loss

    def update(self, parameter: torch.Tensor, group: dict) -> None:
        raise NotImplementedError

    def nesterov(self, parameter: torch.Tensor, gradient: torch.Tensor, momentum: float) -> torch.Tensor:
        """PyTorch SGD's Nesterov direction: buffer ← m·buffer + g, direction g + m·buffer (buffer kept in the state)."""
        state = self.state[parameter]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(parameter)
        buffer = state["momentum_buffer"].mul_(momentum).add_(gradient)
        return gradient.add(buffer, alpha=momentum)


class MuonSGD(MuonOptimizer):
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
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "newton_schulz_steps": newton_schulz_steps})

    def update(self, parameter: torch.Tensor, group: dict) -> None:
        gradient = parameter.grad
        if group["weight_decay"] and not group["orthogonalize"]:
            gradient = gradient.add(parameter, alpha=group["weight_decay"])
        update = self.nesterov(parameter, gradient, group["momentum"])
        if group["orthogonalize"]:
            parameter.mul_(math.sqrt(parameter.shape[0]) / parameter.norm().clamp_min(1e-12))
            update = orthogonalize(update.reshape(len(update), -1), group["newton_schulz_steps"]).view_as(parameter)
        parameter.add_(update, alpha=-group["lr"])


# Moonlight's factor: an orthogonalised (rows, cols) update times 0.2·√max(rows, cols) has about AdamW's update RMS.
MATCH_ADAMW_RMS = 0.2


class MuonAdamW(MuonOptimizer):
    """Args (per group, defaults from the constructor):
        lr: learning rate of both kinds of group (see the module docstring).
        betas: AdamW's moment decays.
        momentum: Muon's Nesterov momentum.
        weight_decay: decoupled weight decay (p ← p·(1 − lr·wd)) for both kinds.
        orthogonalize: True for Muon groups (matrices and filter banks).
        eps, newton_schulz_steps: AdamW's denominator floor; iterations of `orthogonalize`.
    """

    def __init__(self, params, lr: float, betas: tuple[float, float] = (0.9, 0.999), momentum: float = 0.95,
                 weight_decay: float = 0.0, eps: float = 1e-8, newton_schulz_steps: int = 5) -> None:
        if lr <= 0 or not 0 <= momentum < 1 or weight_decay < 0 or not all(0 <= beta < 1 for beta in betas):
            raise ValueError(f"MuonAdamW needs lr > 0, momentum and betas in [0, 1), weight_decay >= 0; got {lr}, {momentum}, {betas}, {weight_decay}")
        super().__init__(params, {"lr": lr, "betas": betas, "momentum": momentum, "weight_decay": weight_decay, "eps": eps,
                                  "newton_schulz_steps": newton_schulz_steps})

    def update(self, parameter: torch.Tensor, group: dict) -> None:
        step = self._muon_update(parameter, group) if group["orthogonalize"] else self._adamw_update(parameter, group)
        parameter.mul_(1 - group["lr"] * group["weight_decay"])
        parameter.add_(step, alpha=-group["lr"])

    def _muon_update(self, parameter: torch.Tensor, group: dict) -> torch.Tensor:
        direction = self.nesterov(parameter, parameter.grad, group["momentum"]).reshape(len(parameter), -1)  # (rows, cols)
        scale = MATCH_ADAMW_RMS * math.sqrt(max(direction.shape))
        return orthogonalize(direction, group["newton_schulz_steps"]).view_as(parameter).mul_(scale)

    def _adamw_update(self, parameter: torch.Tensor, group: dict) -> torch.Tensor:
        state = self.state[parameter]
        if "step" not in state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(parameter)
            state["exp_avg_sq"] = torch.zeros_like(parameter)
        beta1, beta2 = group["betas"]
        state["step"] += 1
        state["exp_avg"].lerp_(parameter.grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(parameter.grad, parameter.grad, value=1 - beta2)
        corrected_second = state["exp_avg_sq"] / (1 - beta2 ** state["step"])
        return state["exp_avg"] / (1 - beta1 ** state["step"]) / corrected_second.sqrt_().add_(group["eps"])
