"""An exponential moving average of a model's weights, used to validate and test (Polyak averaging; airbench's
lookahead plays the same role).

After every optimiser step: average ← decay · average + (1 − decay) · weights, for every floating-point
parameter; buffers (BatchNorm's running statistics) are the model's own. Evaluation swaps the average in
and back. The average is saved in checkpoints, so a resumed run averages exactly as an uninterrupted one.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn


class WeightAverage:
    def __init__(self, model: nn.Module, decay: float) -> None:
        self.model, self.decay = model, decay
        self.parameters = [p for p in model.parameters() if p.dtype.is_floating_point]
        self.average = [p.detach().clone() for p in self.parameters]

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self.average, [p.detach() for p in self.parameters], 1.0 - self.decay)

    @contextlib.contextmanager
    def swapped_in(self):
        """The model holds the averaged weights inside the block, its own afterwards."""
        with torch.no_grad():
            own = [p.detach().clone() for p in self.parameters]
            for parameter, average in zip(self.parameters, self.average, strict=True):
                parameter.copy_(average)
        try:
            yield self.model
        finally:
            with torch.no_grad():
                for parameter, weights in zip(self.parameters, own, strict=True):
                    parameter.copy_(weights)

    @torch.no_grad()
    def copy_to_model(self) -> None:
        for parameter, average in zip(self.parameters, self.average, strict=True):
            parameter.copy_(average)

    def state_dict(self) -> list[torch.Tensor]:
        return [tensor.detach().cpu() for tensor in self.average]

    def load_state_dict(self, state: list[torch.Tensor]) -> None:
        if len(state) != len(self.average):
            raise ValueError(f"the checkpoint's weight average has {len(state)} tensors, this model {len(self.average)}")
        with torch.no_grad():
            for average, saved in zip(self.average, state, strict=True):
                average.copy_(saved)
