import pytest
import torch

from vitlab.kernels.build import compiled_library
from vitlab.kernels.dropout import kernel_supports, masked_scale, splitmix64_word

pytestmark = pytest.mark.skipif(compiled_library() is None, reason="vitlab's C kernels are not available here")
THRESHOLD = 3277  # p ≈ 0.1 in 15-bit units


def splitmix64_reference(key: int, index: int) -> int:
    """Steele, Lea & Flood 2014, written out in Python."""
    mask = (1 << 64) - 1
    z = (key + (index + 1) * 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


def test_the_generator_is_splitmix64():
    assert splitmix64_word(0, 0) == 0xE220A8397B1DCDAF  # the generator's first output from seed 0
    for key, index in [(0, 1), (12345, 0), (2**63 - 1, 2**40), (2**64 - 1, 7)]:
        assert splitmix64_word(key, index) == splitmix64_reference(key, index)


def test_the_mask_is_the_documented_function_of_key_and_index():
    """Chunk of 256 elements = 64 words; element quarter * 64 + lane takes bits 16·quarter.. of word lane."""
    key, count = 987654321, 700  # not a whole number of chunks
    kept = masked_scale(torch.ones(count), key, THRESHOLD, 1.0) != 0
    expected = []
    for element in range(count):
        chunk, within = divmod(element, 256)
        quarter, lane = divmod(within, 64)
        number = (splitmix64_reference(key, chunk * 64 + lane) >> (16 * quarter)) & 0x7FFF
        expected.append(number >= THRESHOLD)
    assert kept.tolist() == expected


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kept_elements_are_scaled_as_pytorch_rounds_them_and_dropped_ones_are_zero(dtype):
    inputs = (torch.randn(1000, 257, dtype=torch.float64) * 100).to(dtype)
    scale = 1 / (1 - THRESHOLD / 32768)
    kept = masked_scale(torch.ones(inputs.shape, dtype=dtype), 5, THRESHOLD, 1.0) != 0
    outputs = masked_scale(inputs, 5, THRESHOLD, scale)
    assert outputs.dtype == dtype and torch.equal(outputs, torch.where(kept, inputs * scale, 0.0))
    assert abs((~kept).float().mean().item() - THRESHOLD / 32768) < 0.003


def test_the_mask_does_not_depend_on_the_thread_count():
    inputs = torch.randn(300_001)  # above the size that runs on several threads
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(masked_scale(inputs, 42, THRESHOLD, 1.0))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])


def test_every_position_of_a_chunk_is_uniform_and_keys_are_independent():
    ones = torch.ones(256 * 4000)
    first = (masked_scale(ones, 1, 16384, 1.0) == 0).float()  # p = 0.5
    second = (masked_scale(ones, 2, 16384, 1.0) == 0).float()
    per_position = first.view(-1, 256).mean(0)  # 4,000 draws each: std 0.008
    assert torch.all((per_position - 0.5).abs() < 0.04)
    both = (first * second).mean().item()  # independent masks: 0.25, std 0.0004
    assert abs(both - 0.25) < 0.003
    neighbours = (first[1:] * first[:-1]).mean().item()
    assert abs(neighbours - 0.25) < 0.003


def test_special_values_and_layouts():
    inputs = torch.tensor([float("nan"), float("inf"), -float("inf"), 3.0] * 64, dtype=torch.bfloat16)
    kept = masked_scale(torch.ones(256, dtype=torch.bfloat16), 9, THRESHOLD, 1.0) != 0
    outputs = masked_scale(inputs, 9, THRESHOLD, 2.0)
    assert torch.all(outputs[~kept] == 0)  # dropped: 0 whatever the value
    assert torch.equal(outputs[kept].isnan(), inputs[kept].isnan())
    assert torch.equal(outputs[kept & ~inputs.isnan()], inputs[kept & ~inputs.isnan()] * 2)
    transposed = torch.randn(64, 48).t()  # not contiguous: handled as its contiguous copy
    assert torch.equal(masked_scale(transposed, 3, THRESHOLD, 1.0), masked_scale(transposed.contiguous(), 3, THRESHOLD, 1.0))
    assert masked_scale(torch.ones(0), 3, THRESHOLD, 1.0).shape == (0,)


def test_which_inputs_the_kernel_takes():
    assert kernel_supports(torch.ones(3, dtype=torch.bfloat16)) and kernel_supports(torch.ones(3))
    assert not kernel_supports(torch.ones(3, dtype=torch.float16))
    assert not kernel_supports(torch.ones(3, dtype=torch.float64))
