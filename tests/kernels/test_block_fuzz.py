"""Random ViT blocks through kernels/block.c against the same kernels called from Python: widths, heads, MLP widths,
token counts, batches, pooling, LSA and attention dropout drawn by hypothesis; logits, the input's gradient and every
parameter's gradient must be the same bits (and nothing may read or write outside its buffers: a crash fails it)."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vitlab.kernels import block as block_kernel
from vitlab.kernels import compiled_library
from vitlab.models import build_model
from vitlab.models.fused_block import blocks_from_python

LIBRARY = compiled_library()
pytestmark = pytest.mark.skipif(LIBRARY is None or not block_kernel.sizes_supported(8 * 65, 64, 256, LIBRARY),
                                reason="the linear layers' products run in oneDNN here (AMX) or there are no C kernels")


@st.composite
def blocks(draw):
    head_size = draw(st.sampled_from([16, 32, 48, 64]))
    heads = draw(st.integers(1, max(1, 160 // head_size)))
    width = head_size * heads
    return {
        "config": {"hidden_size": width, "num_heads": heads, "num_blocks": draw(st.integers(1, 3)),
                   "patch_size": draw(st.sampled_from([4, 8, 16])), "mlp_ratio": draw(st.sampled_from([0.5, 1.0, 2.0, 4.0])),
                   "pool": draw(st.sampled_from(["cls", "mean"])), "lsa": draw(st.booleans()),
                   "attention_dropout": draw(st.sampled_from([0.0, 0.0, 0.2]))},
        "batch": draw(st.integers(1, 5)),
        "seed": draw(st.integers(0, 2 ** 16)),
    }


def logits_and_gradients(model, images, labels, from_python: bool):
    model.zero_grad(set_to_none=True)
    images.grad = None
    torch.manual_seed(3)  # the same attention-dropout keys both ways
    with torch.autocast("cpu", dtype=torch.bfloat16), blocks_from_python() if from_python else torch.enable_grad():
        logits = model(images)
        loss = torch.nn.functional.cross_entropy(logits.float(), labels)
    loss.backward()
    return logits.detach(), images.grad, {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(blocks())
def test_random_blocks_in_c_give_the_bits_of_their_kernels_called_from_python(case):
    config = case["config"]
    torch.manual_seed(case["seed"])
    model = build_model("vit", **config).train()
    torch.nn.init.normal_(model.head.weight, std=0.5)  # a zero head would hide the blocks' logits
    generator = torch.Generator().manual_seed(case["seed"])
    images = torch.randn(case["batch"], 3, 32, 32, generator=generator).requires_grad_(True)
    labels = torch.randint(0, 10, (case["batch"],), generator=generator)
    calls, run = [], block_kernel.run_forward
    block_kernel.run_forward = lambda *arguments: calls.append(1) or run(*arguments)  # full blocks in C (not the CLS-only one)
    try:
        one_call = logits_and_gradients(model, images, labels, from_python=False)
    finally:
        block_kernel.run_forward = run
    tokens = (32 // config["patch_size"]) ** 2
    hidden = int(config["hidden_size"] * config["mlp_ratio"])
    if config["pool"] == "mean" and block_kernel.sizes_supported(case["batch"] * tokens, config["hidden_size"], hidden, LIBRARY):
        assert len(calls) == config["num_blocks"]  # every block in C (under CLS pooling the last is the first-token one)
    from_python = logits_and_gradients(model, images, labels, from_python=True)
    assert torch.equal(one_call[0], from_python[0]) and torch.equal(one_call[1], from_python[1])
    assert one_call[2].keys() == from_python[2].keys()
    for name, gradient in from_python[2].items():
        assert torch.equal(one_call[2][name], gradient), name
