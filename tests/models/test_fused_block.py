from contextlib import nullcontext

import pytest
import torch

import vitlab.models.vit as vit_module
from vitlab.kernels import attention as attention_kernel
from vitlab.kernels import block as block_kernel
from vitlab.kernels import compiled_library
from vitlab.models import build_model
from vitlab.models.fused_block import BlockOnKernels, FirstTokenBlockOnKernels, blocks_as_separate_nodes, blocks_from_python

SUPPORTED = attention_kernel.kernel_supports(torch.zeros(2, 65, 3, 4, 16, dtype=torch.bfloat16))
pytestmark = pytest.mark.skipif(not SUPPORTED, reason="no AVX-512 BF16 C kernels on this machine")
# a whole block in one call into C: where the linear layers' products run in matmul.c (AVX-512 BF16 without AMX)
IN_ONE_CALL = SUPPORTED and block_kernel.sizes_supported(6 * 65, 64, 256, compiled_library())
needs_one_call = pytest.mark.skipif(not IN_ONE_CALL, reason="the linear layers' products run in oneDNN here (AMX)")

SMALL = {"patch_size": 4, "hidden_size": 64, "num_heads": 4}
CONFIGS = {
    "CLS pooling, outputs deferred to the next block": {**SMALL, "num_blocks": 3},
    "CLS pooling, LSA, one block": {**SMALL, "num_blocks": 1, "lsa": True},
    "LSA, shifted patches, sequence pooling": {**SMALL, "num_blocks": 2, "mlp_ratio": 2.0, "stem": "spt", "lsa": True, "pool": "seq"},
    "attention dropout, mean pooling": {**SMALL, "num_blocks": 2, "attention_dropout": 0.1, "pool": "mean"},
}
# block.c's own cases: a width that is not a multiple of 64 (three heads of 16), an MLP narrower than the width
ONE_CALL_CONFIGS = {**CONFIGS, "width 48, three heads, MLP of 16": {"patch_size": 4, "hidden_size": 48, "num_heads": 3, "num_blocks": 2,
                                                                   "mlp_ratio": 1 / 3}}


@pytest.fixture
def fused_calls(monkeypatch):
    """The blocks that ran as one node since the test began: "block" or "first token" (the CLS-only last block)."""
    calls = []
    for kind, function in (("block", BlockOnKernels), ("first token", FirstTokenBlockOnKernels)):
        monkeypatch.setattr(getattr(vit_module, function.__name__), "apply",
                            lambda *arguments, kind=kind, apply=function.apply: calls.append(kind) or apply(*arguments))
    return calls


@pytest.fixture
def one_calls(monkeypatch):
    """The calls into block.c since the test began: "forward" or "backward", and "first token forward" or "first token
    backward" for the CLS-only last block."""
    calls = []
    for kind in ("forward", "backward", "first token forward", "first token backward"):
        name = "run_" + kind.replace(" ", "_")
        monkeypatch.setattr(block_kernel, name, lambda *arguments, kind=kind, run=getattr(block_kernel, name): calls.append(kind) or run(*arguments))
    return calls


def logits_and_gradients(model, images, labels, separate: bool = False, autocast: bool = True, from_python: bool = False):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)  # the same attention-dropout keys for both paths
    paths = blocks_as_separate_nodes() if separate else blocks_from_python() if from_python else nullcontext()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), paths:
        logits = model(images)
        loss = torch.nn.functional.cross_entropy(logits.float(), labels)
    loss.backward()
    return logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def batch(size: int = 6):
    generator = torch.Generator().manual_seed(1)
    return torch.randn(size, 3, 32, 32, generator=generator), torch.randint(0, 10, (size,), generator=generator)


@pytest.mark.parametrize("name", ONE_CALL_CONFIGS)
@needs_one_call
def test_a_block_in_one_call_into_c_gives_the_bits_of_its_kernels_called_from_python(name, fused_calls, one_calls):
    torch.manual_seed(0)
    model = build_model("vit", **ONE_CALL_CONFIGS[name]).train()
    images, labels = batch()
    images.requires_grad_(True)
    one_call_logits, one_call_gradients = logits_and_gradients(model, images, labels)
    full_blocks, cls_only = fused_calls.count("block"), fused_calls.count("first token")
    assert full_blocks + cls_only == ONE_CALL_CONFIGS[name]["num_blocks"]
    assert one_calls == (["forward"] * full_blocks + ["first token forward"] * cls_only
                         + ["first token backward"] * cls_only + ["backward"] * full_blocks)
    one_call_input_gradient, images.grad = images.grad, None
    one_calls.clear()
    logits, gradients = logits_and_gradients(model, images, labels, from_python=True)
    assert not one_calls and fused_calls.count("block") == 2 * full_blocks and fused_calls.count("first token") == 2 * cls_only
    assert torch.equal(one_call_logits, logits) and torch.equal(one_call_input_gradient, images.grad)
    assert one_call_gradients.keys() == gradients.keys()
    for parameter, gradient in gradients.items():
        assert torch.equal(one_call_gradients[parameter], gradient), parameter


@needs_one_call
@pytest.mark.parametrize("pool", ["mean", "cls"])
def test_a_frozen_layer_takes_its_block_backward_to_python_after_a_forward_in_one_call(pool, fused_calls, one_calls):
    torch.manual_seed(0)
    model = build_model("vit", **SMALL, num_blocks=3, pool=pool).train()
    model.blocks[1].attention.qkv.weight.requires_grad_(False)
    model.blocks[2].mlp[3].weight.requires_grad_(False)  # the CLS-only last block's, under CLS pooling
    images, labels = batch()
    images.requires_grad_(True)
    one_call_logits, one_call_gradients = logits_and_gradients(model, images, labels)
    last = "first token forward" if pool == "cls" else "forward"
    assert one_calls == ["forward", "forward", last, "backward"]  # blocks 2 and 1 went backward in Python, block 0 in C
    one_call_input_gradient, images.grad = images.grad, None
    logits, gradients = logits_and_gradients(model, images, labels, from_python=True)
    assert torch.equal(one_call_logits, logits) and torch.equal(one_call_input_gradient, images.grad)
    assert one_call_gradients.keys() == gradients.keys() and "blocks.1.attention.qkv.weight" not in gradients
    for parameter, gradient in gradients.items():
        assert torch.equal(one_call_gradients[parameter], gradient), parameter


def test_blocks_too_wide_or_too_small_for_the_matmul_kernel_or_under_a_profiler_call_their_kernels_from_python(fused_calls, one_calls):
    torch.manual_seed(0)
    wide = build_model("vit", patch_size=4, hidden_size=192, num_heads=12, num_blocks=2, pool="mean").train()  # QKV: 576 > 512
    logits_and_gradients(wide, *batch(2))
    assert fused_calls == ["block", "block"] and not one_calls
    assert not block_kernel.sizes_supported(130, 192, 768, block_kernel.loaded_library())
    fused_calls.clear()
    # one image of 4 patches: the MLP's products (4 × 64 × 16 multiply-adds) are PyTorch's own in the Python path
    small = build_model("vit", patch_size=16, hidden_size=64, num_heads=4, num_blocks=2, mlp_ratio=0.25, pool="mean").train()
    images, labels = batch(1)
    small_logits, small_gradients = logits_and_gradients(small, images, labels)
    assert fused_calls == ["block", "block"] and not one_calls
    logits, gradients = logits_and_gradients(small, images, labels, separate=True)
    assert torch.equal(small_logits, logits) and all(torch.equal(small_gradients[name], g) for name, g in gradients.items())
    fused_calls.clear()
    model = build_model("vit", **SMALL, num_blocks=2, pool="mean").train()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]):
        logits_and_gradients(model, *batch())
    assert fused_calls == ["block"] * 2 and not one_calls


@pytest.mark.parametrize("name", CONFIGS)
def test_a_block_as_one_node_gives_the_bits_of_its_parts(name, fused_calls):
    torch.manual_seed(0)
    model = build_model("vit", **CONFIGS[name]).train()
    model.blocks[0].mlp[0].weight.requires_grad_(False)  # a frozen layer: no gradient either way
    images, labels = batch()
    images.requires_grad_(True)  # the gradient reaching the input, through every block
    fused_logits, fused_gradients = logits_and_gradients(model, images, labels)
    blocks = CONFIGS[name]["num_blocks"]
    if CONFIGS[name].get("pool", "cls") == "cls":  # the last block computes the CLS token alone
        assert fused_calls == ["block"] * (blocks - 1) + ["first token"]
    else:
        assert fused_calls == ["block"] * blocks
    fused_calls.clear()
    fused_input_gradient, images.grad = images.grad, None
    logits, gradients = logits_and_gradients(model, images, labels, separate=True)
    assert not fused_calls
    assert torch.equal(fused_logits, logits) and torch.equal(fused_input_gradient, images.grad)
    assert fused_gradients.keys() == gradients.keys() == {name for name, p in model.named_parameters() if p.requires_grad}
    for parameter, gradient in gradients.items():
        assert torch.equal(fused_gradients[parameter], gradient), parameter


def steps_aside_for_hook(model):
    model.blocks[0].mlp[3].register_forward_hook(lambda module, inputs, output: None)
    return model


def steps_aside_for_output_dropout(model):
    model.blocks[0].attention.output_dropout.p = 0.1
    return model


def steps_aside_for_replaced_forward(model):
    norm = model.blocks[0].mlp_norm
    norm.forward = lambda x: torch.nn.LayerNorm.forward(norm, x)
    return model


@pytest.mark.parametrize("change", [steps_aside_for_hook, steps_aside_for_output_dropout, steps_aside_for_replaced_forward])
def test_a_block_with_a_hook_an_active_dropout_or_a_replaced_part_runs_its_parts(change, fused_calls):
    torch.manual_seed(0)
    model = change(build_model("vit", **SMALL, num_blocks=2, pool="mean")).train()
    logits_and_gradients(model, *batch())
    assert fused_calls == ["block"]  # block 1 still fuses; block 0 does not


def test_the_cls_only_block_with_attention_dropout_runs_its_parts_with_the_same_bits(fused_calls):
    torch.manual_seed(0)
    model = build_model("vit", **SMALL, num_blocks=2, attention_dropout=0.1).train()
    images, labels = batch()
    fused_logits, fused_gradients = logits_and_gradients(model, images, labels)
    assert fused_calls == ["block"]  # the single-query kernel has no dropout: the CLS block's parts run themselves
    logits, gradients = logits_and_gradients(model, images, labels, separate=True)
    assert torch.equal(fused_logits, logits) and all(torch.equal(fused_gradients[name], g) for name, g in gradients.items())


def test_blocks_run_their_parts_without_autocast_without_gradients_for_attention_maps_and_post_norm(fused_calls):
    torch.manual_seed(0)
    model = build_model("vit", **SMALL, num_blocks=2, pool="mean").train()
    images, labels = batch()
    logits_and_gradients(model, images, labels, autocast=False)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(images, return_attention=True)
    post_norm = build_model("vit", **SMALL, num_blocks=2, pool="mean", norm="post").train()
    logits_and_gradients(post_norm, images, labels)
    assert not fused_calls


def test_a_global_module_hook_stops_the_fusion(fused_calls):
    torch.manual_seed(0)
    model = build_model("vit", **SMALL, num_blocks=2, pool="mean").train()
    handle = torch.nn.modules.module.register_module_forward_hook(lambda module, inputs, output: None)
    try:
        logits_and_gradients(model, *batch())
    finally:
        handle.remove()
    assert not fused_calls


def test_a_retained_graph_gives_the_same_gradients_twice_and_a_second_derivative_is_refused(fused_calls):
    torch.manual_seed(0)
    model = build_model("vit", **SMALL, num_blocks=2, pool="mean").train()
    images, labels = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(model(images).float(), labels)
    assert fused_calls
    first = torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)
    second = torch.autograd.grad(loss, list(model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(model(images).float(), labels)
    with pytest.raises(RuntimeError, match="cannot be differentiated twice"):
        torch.autograd.grad(loss, list(model.parameters()), create_graph=True)


def test_torch_compile_traces_a_vit_without_stepping_into_the_kernels_checks():
    """Under torch.compile the blocks run PyTorch's operators; the fusion's check must not make Dynamo trace into the
    library's loading (the file system) or its cache: no graph break."""
    torch.manual_seed(0)
    model = build_model("vit", **SMALL, num_blocks=2).train()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = compiled(batch()[0])
    assert logits.shape == (6, 10)


def test_a_deferred_output_that_reaches_no_loss_gives_its_layers_no_gradient_as_unfused(fused_calls):
    torch.manual_seed(0)
    block = build_model("vit", **SMALL, num_blocks=1).blocks[0].train()
    tokens = torch.randn(4, 65, 64, requires_grad=True)
    results = []
    for separate in (False, True):
        block.zero_grad(set_to_none=True)
        tokens.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16), blocks_as_separate_nodes() if separate else nullcontext():
            after_attention, _, (mlp_out, _) = block(tokens, defer_output=True)
        after_attention.square().sum().backward()  # the MLP's output (mlp_out) is left unused
        results.append((tokens.grad, {name: p.grad for name, p in block.named_parameters()}))
    assert fused_calls == ["block"]
    (fused_tokens, fused), (tokens_grad, separate) = results
    assert torch.equal(fused_tokens, tokens_grad)
    for name, gradient in separate.items():
        assert (gradient is None) == (fused[name] is None), name
        assert gradient is None or torch.equal(gradient, fused[name]), name
    assert separate["mlp.0.weight"] is None and separate["mlp_norm.weight"] is not None
