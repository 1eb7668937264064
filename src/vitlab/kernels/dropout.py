"""ctypes bindings of dropout.c: one pass forward, the mask regenerated from its key in backward."""

from __future__ import annotations

import torch

from vitlab.kernels.build import compiled_library, loaded_library

# dtype → name of the C function that handles it
FUNCTIONS = {torch.bfloat16: "vitlab_dropout_bf16", torch.float32: "vitlab_dropout_f32"}


def kernel_supports(inputs: torch.Tensor) -> bool:
    """Whether `masked_scale` can take these inputs (a CPU tensor of a handled dtype, and a compiler present)."""
    return inputs.device.type == "cpu" and inputs.dtype in FUNCTIONS and compiled_library() is not None


def random_key(device: torch.device) -> int:
    """A 63-bit key drawn from PyTorch's generator, so torch.manual_seed and checkpointed RNG state fix the masks."""
    return int(torch.empty((), dtype=torch.int64, device=device).random_())


def masked_scale(inputs: torch.Tensor, key: int, threshold: int, scale: float) -> torch.Tensor:
    """inputs × scale where element i's 15-bit SplitMix64 number under `key` is >= threshold, else 0 (same shape).

    The same key and shape always give the same mask, whatever the thread count."""
    inputs = inputs.contiguous()
    out = torch.empty_like(inputs)
    function = getattr(loaded_library(), FUNCTIONS[inputs.dtype])
    function(inputs.data_ptr(), out.data_ptr(), inputs.numel(), key, threshold, scale, torch.get_num_threads())
    return out


def splitmix64_word(key: int, index: int) -> int:
    """Word `index` of the generator seeded with `key` (the mask's random bits), for checking it against a reference."""
    return loaded_library().vitlab_splitmix64_word(key, index)
