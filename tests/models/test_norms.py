import pytest
import torch
from torch import nn

from vitlab.kernels import layer_norm as layer_norm_kernel
from vitlab.models.base import cpu_autocast_dtype
from vitlab.models.norms import MatmulInputNorm

SUPPORTED = layer_norm_kernel.kernel_supports(torch.zeros(2, 16), torch.ones(16), torch.zeros(16))


def norms(features: int = 64) -> tuple[MatmulInputNorm, nn.LayerNorm]:
    torch.manual_seed(0)
    kernel_norm = MatmulInputNorm(features)
    nn.init.normal_(kernel_norm.weight), nn.init.normal_(kernel_norm.bias)
    plain = nn.LayerNorm(features)
    plain.load_state_dict(kernel_norm.state_dict())  # the same parameters and state as nn.LayerNorm
    return kernel_norm, plain


def test_autocast_dtype_is_read_inside_and_outside_autocast():
    assert cpu_autocast_dtype() is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert cpu_autocast_dtype() == torch.bfloat16


@pytest.mark.skipif(not SUPPORTED, reason="no AVX-512 C kernels on this machine")
def test_under_bf16_autocast_it_gives_the_cast_nn_layernorm_output_and_its_gradients():
    kernel_norm, plain = norms()
    x = torch.randn(4, 9, 64) * 2 + 1
    grad = torch.randn(4, 9, 64).to(torch.bfloat16)
    results = []
    for module in (kernel_norm, plain):
        inputs = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = module(inputs)
            projected = out.to(torch.bfloat16)  # what the next linear layer reads under autocast
        projected.backward(grad)
        results.append((projected, inputs.grad, module.weight.grad, module.bias.grad))
    (kernel_out, *kernel_grads), (plain_out, *plain_grads) = results
    assert kernel_out.dtype == torch.bfloat16
    torch.testing.assert_close(kernel_out.float(), plain_out.float(), rtol=2**-7, atol=1e-3)  # at most one bf16 step apart
    for got, expected in zip(kernel_grads, plain_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_outside_autocast_with_a_hook_or_a_bf16_input_it_is_nn_layernorm(monkeypatch):
    kernel_norm, plain = norms()
    calls = []
    monkeypatch.setattr(layer_norm_kernel, "layer_norm_forward", lambda *args: calls.append(args) or (_ for _ in ()).throw(AssertionError))
    x = torch.randn(3, 5, 64)
    assert torch.equal(kernel_norm(x), plain(x))  # no autocast: fp32 output
    handle = kernel_norm.register_forward_hook(lambda module, inputs, output: None)  # e.g. a CAM's
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hooked = kernel_norm(x)
        from_bf16 = kernel_norm(x.to(torch.bfloat16))
    handle.remove()
    assert hooked.dtype == torch.float32 and from_bf16.shape == x.shape and not calls


def test_a_pre_norm_vit_uses_it_and_a_post_norm_one_does_not():
    from vitlab.models import build_model

    pre = build_model("vit", patch_size=8, hidden_size=32, num_heads=2, num_blocks=1)
    post = build_model("vit", patch_size=8, hidden_size=32, num_heads=2, num_blocks=1, norm="post")
    assert isinstance(pre.blocks[0].attention_norm, MatmulInputNorm) and isinstance(pre.blocks[0].mlp_norm, MatmulInputNorm)
    assert type(post.blocks[0].attention_norm) is nn.LayerNorm  # its output is the residual stream itself
    assert set(pre.blocks[0].state_dict()) == set(post.blocks[0].state_dict())


@pytest.mark.skipif(not SUPPORTED, reason="no AVX-512 C kernels on this machine")
def test_after_residual_adds_then_normalises_like_separate_operations():
    kernel_norm, plain = norms()
    torch.manual_seed(1)
    x, addend, addend_bias = torch.randn(4, 9, 64), torch.randn(4, 9, 64).to(torch.bfloat16), torch.randn(64)
    grad_total, grad_out = torch.randn(4, 9, 64), torch.randn(4, 9, 64).to(torch.bfloat16)
    results = []
    for fused in (True, False):
        inputs = [t.clone().requires_grad_() for t in (x, addend, addend_bias)]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if fused:
                total, out = kernel_norm.after_residual(*inputs)
            else:
                total = inputs[0] + inputs[1].float() + inputs[2]  # the kernel adds in fp32
                out = plain(total).to(torch.bfloat16)
        torch.autograd.backward([total, out], [grad_total, grad_out])
        results.append((total, out, *(t.grad for t in inputs)))
    (total, out, *grads), (plain_total, plain_out, *plain_grads) = results
    assert total.dtype == torch.float32 and out.dtype == torch.bfloat16 and grads[1].dtype == torch.bfloat16
    torch.testing.assert_close(total, plain_total, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.float(), plain_out.float(), rtol=2**-7, atol=0.02)
    for got, expected in zip(grads, plain_grads, strict=True):
        torch.testing.assert_close(got.float(), expected.float(), rtol=2**-7, atol=1e-3 * expected.abs().max().item())


def test_after_residual_outside_autocast_is_add_then_nn_layernorm(monkeypatch):
    kernel_norm, plain = norms()
    monkeypatch.setattr(layer_norm_kernel, "residual_layer_norm_forward", lambda *args: (_ for _ in ()).throw(AssertionError))
    x, addend, addend_bias = torch.randn(2, 3, 64), torch.randn(2, 3, 64), torch.randn(64)
    total, out = kernel_norm.after_residual(x, addend, addend_bias)
    assert torch.equal(total, x + (addend + addend_bias)) and torch.equal(out, plain(total))


def test_a_norm_whose_forward_was_replaced_on_the_instance_takes_no_kernel():
    from vitlab.models.norms import MatmulInputNorm

    norm = MatmulInputNorm(64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        applies = norm.kernel_applies()
        norm.forward = lambda t: t
        assert not norm.kernel_applies()
    assert applies
