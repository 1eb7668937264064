import pytest
import torch

from vitlab.kernels import block as block_kernel
from vitlab.kernels import compiled_library, release_buffers
from vitlab.kernels.build import available_kernels, library_capabilities, loaded_library
from vitlab.models import build_model
from vitlab.models.fused_block import blocks_from_python

LIBRARY = compiled_library()
IN_ONE_CALL = LIBRARY is not None and block_kernel.sizes_supported(8 * 65, 64, 256, LIBRARY)


def test_a_block_goes_to_c_only_where_its_four_products_run_in_the_matmul_kernel():
    if LIBRARY is None:
        pytest.skip("no C kernels here")
    matmul = library_capabilities(LIBRARY).matmul
    assert block_kernel.sizes_supported(8 * 65, 64, 256, LIBRARY) == (matmul and library_capabilities(LIBRARY).block)
    assert not block_kernel.sizes_supported(8 * 65, 192, 768, LIBRARY)  # the QKV product's 576 outputs: more than 512
    assert not block_kernel.sizes_supported(8 * 65, 64, 600, LIBRARY)  # the MLP's 600: not a multiple of 16
    assert not block_kernel.sizes_supported(1, 16, 16, LIBRARY)  # 256 multiply-adds: PyTorch computes such products itself
    assert not block_kernel.sizes_supported(8 * 65, 64, 256, None)
    assert ("pre-norm ViT blocks in one call" in available_kernels(LIBRARY)) == library_capabilities(LIBRARY).block  # the status line


def logits_both_ways(model, monkeypatch) -> list[torch.Tensor]:
    """The model's logits with its blocks in one call into C (which the test sees) and with their kernels called from
    Python."""
    calls = []
    run = block_kernel.run_forward
    monkeypatch.setattr(block_kernel, "run_forward", lambda *arguments: calls.append(1) or run(*arguments))
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    outputs = []
    for from_python in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16), blocks_from_python() if from_python else torch.enable_grad():
            outputs.append(model(images).detach())
    assert len(calls) == len(model.blocks)  # every block in C the first time, none the second
    return outputs


@pytest.mark.skipif(not IN_ONE_CALL, reason="the linear layers' products run in oneDNN here (AMX) or there are no C kernels")
@pytest.mark.parametrize("special", [
    [1 + 2 ** -8, 1 + 3 * 2 ** -8, -(1 + 2 ** -8), 2 ** -8 * (1 + 2 ** -8), 1e-40, -1e-39, 2 ** -126 * 1.5, 0.0],  # ties, subnormals
    [float("nan"), float("inf"), -float("inf"), 3.4e38, -3.4e38, 1.0, 0.5, 0.25]])  # NaN, infinities, overflow
def test_weights_are_rounded_to_bf16_in_c_as_pytorch_rounds_them(special, monkeypatch):
    torch.manual_seed(0)
    model = build_model("vit", patch_size=4, hidden_size=64, num_heads=4, num_blocks=2, pool="mean").train()
    with torch.no_grad():
        model.head.weight.normal_()  # (it starts at zero: logits that said nothing of the blocks)
        for layer in (model.blocks[0].attention.qkv, model.blocks[0].attention.projection, model.blocks[0].mlp[0], model.blocks[0].mlp[3]):
            layer.weight[3, :8] = torch.tensor(special)
    one_call, from_python = logits_both_ways(model, monkeypatch)
    assert torch.equal(one_call.view(torch.int32), from_python.view(torch.int32))  # NaNs too, bit for bit
    assert one_call.isfinite().all() == all(abs(value) < 1e38 for value in special)


def test_weights_of_other_shapes_than_a_block_of_that_width_stay_out_of_c():
    qkv, projection, first, last = torch.zeros(192, 64), torch.zeros(64, 64), torch.zeros(256, 64), torch.zeros(64, 256)
    assert block_kernel.layers_fit(64, 4, qkv, projection, first, last)
    assert not block_kernel.layers_fit(64, 4, torch.zeros(96, 64), projection, first, last)  # a replaced QKV layer
    assert not block_kernel.layers_fit(64, 4, qkv, torch.zeros(64, 32), first, last)
    assert not block_kernel.layers_fit(64, 4, qkv, projection, first, torch.zeros(64, 128))  # the MLP's widths disagree
    assert not block_kernel.layers_fit(64, 3, qkv, projection, first, last)  # 64 features in 3 heads


@pytest.mark.skipif(not IN_ONE_CALL, reason="the linear layers' products run in oneDNN here (AMX) or there are no C kernels")
def test_the_blocks_temporaries_are_kept_between_calls_reused_as_they_are_and_freed_by_release_buffers(monkeypatch):
    torch.manual_seed(0)
    # a full block, then the CLS-only last block: both kinds of C call
    model = build_model("vit", patch_size=4, hidden_size=64, num_heads=4, num_blocks=2, pool="cls").train()
    with torch.no_grad():
        model.head.weight.normal_()
    calls = []
    for name in ("run_forward", "run_backward", "run_first_token_forward", "run_first_token_backward"):
        run = getattr(block_kernel, name)
        monkeypatch.setattr(block_kernel, name, lambda *arguments, name=name, run=run: calls.append(name) or run(*arguments))

    def gradients(images: torch.Tensor) -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(images).float().square().sum().backward()
        return [parameter.grad.clone() for parameter in model.parameters()]

    generator = torch.Generator().manual_seed(1)
    batch, other_batch = (torch.randn(32, 3, 32, 32, generator=generator) for _ in range(2))
    release_buffers()
    assert block_kernel.scratch_bytes() == 0
    fresh = gradients(batch)  # temporaries from malloc
    assert sorted(set(calls)) == ["run_backward", "run_first_token_backward", "run_first_token_forward", "run_forward"]
    held = block_kernel.scratch_bytes()
    rows, width, hidden = 32 * 65, 64, 256
    # bf16 (rows, hidden) twice (the MLP's product; in backward its two gradients), bf16 (rows, width) three times (the
    # projection's product; the backward's three gradients of that size), bf16 (rows, 3 width) once, and fp32 (rows,
    # width) twice (the stream's gradient; the CLS-only block's keys' and values' gradient has its size)
    assert held == 2 * (2 * rows * hidden) + 3 * (2 * rows * width) + 2 * rows * 3 * width + 2 * (4 * rows * width)
    gradients(other_batch)
    assert block_kernel.scratch_bytes() == held  # the same buffers again, no more
    for byte in (0xFF, 0x00):  # every kept byte NaN's, then zero: a temporary read before it is written changes the results
        assert loaded_library().vitlab_block_fill_scratch(byte) == held
        again = gradients(batch)
        assert all(torch.equal(first, second) for first, second in zip(fresh, again, strict=True))
    assert release_buffers() >= held
    assert block_kernel.scratch_bytes() == 0


@pytest.mark.skipif(not IN_ONE_CALL, reason="the linear layers' products run in oneDNN here (AMX) or there are no C kernels")
def test_a_size_no_longer_asked_for_gives_its_kept_buffer_up_when_every_slot_is_taken():
    torch.manual_seed(0)
    model = build_model("vit", patch_size=4, hidden_size=64, num_heads=4, num_blocks=1, pool="mean").train()

    def train_once(batch: int) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(torch.randn(batch, 3, 32, 32)).float().sum().backward()

    release_buffers()
    for batch in range(2, 9):  # seven sizes of four buffers each (seven buffers a block): more than the 32 slots
        train_once(batch)
    train_once(9)
    rows, width, hidden = 9 * 64, 64, 256  # mean pooling: no CLS token, 64 patches an image
    # the last size's seven buffers all kept, in slots that stale sizes gave up
    kept = {2 * rows * hidden: 2, 2 * rows * width: 3, 2 * rows * 3 * width: 1, 4 * rows * width: 1}
    assert {size: block_kernel.scratch_bytes(size) // size for size in kept} == kept
    release_buffers()
