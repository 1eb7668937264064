import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vitlab.kernels import switch_kernels
from vitlab.kernels import weight_gradient as weight_gradient_kernel
from vitlab.models import build_model
from vitlab.models.fused_block import blocks_as_separate_nodes
from vitlab.models.linear import KernelLinear, kernel_applies, linear, run_linear

SUPPORTED = weight_gradient_kernel.kernel_supports(16, 16, True)
needs_kernel = pytest.mark.skipif(not SUPPORTED, reason="no AVX-512 BF16 C kernels on this machine, or AMX (oneDNN's products)")


def cpu_bf16():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def autocast_and_kernel_gradients(x, weight, bias, grad_out):
    """(outputs, x grads, weight grads, bias grads) of F.linear under autocast and of `linear`, from the same inputs."""
    results = []
    for function in (F.linear, linear):
        x_, weight_ = x.clone().requires_grad_(), weight.clone().requires_grad_()
        bias_ = None if bias is None else bias.clone().requires_grad_()
        with cpu_bf16():
            out = function(x_, weight_, bias_)
        out.backward(grad_out)
        results.append((out, x_.grad, weight_.grad, None if bias_ is None else bias_.grad))
    return results


@needs_kernel
@pytest.mark.parametrize("with_bias", [True, False])
def test_forward_and_input_gradient_are_autocasts_bit_for_bit_the_weight_gradients_fp32_sums(with_bias):
    torch.manual_seed(0)
    x = torch.randn(8, 65, 64).to(torch.bfloat16)
    weight, bias = torch.randn(192, 64) * 0.1, (torch.randn(192) if with_bias else None)
    grad_out = torch.randn(8, 65, 192).to(torch.bfloat16)
    with cpu_bf16():
        assert kernel_applies(x, weight, bias)
    (out_a, gx_a, gw_a, gb_a), (out_k, gx_k, gw_k, gb_k) = autocast_and_kernel_gradients(x, weight, bias, grad_out)
    assert out_k.dtype == torch.bfloat16 and torch.equal(out_a, out_k) and torch.equal(gx_a, gx_k)
    assert out_k.grad_fn.name().endswith("KernelLinearBackward")
    grad_rows = grad_out.reshape(-1, 192).double()
    exact_weight = grad_rows.t() @ x.reshape(-1, 64).double()
    assert gw_k.dtype == torch.float32
    torch.testing.assert_close(gw_k.double(), exact_weight, rtol=0, atol=1e-4)
    # autocast's weight gradient is that sum rounded to bf16
    torch.testing.assert_close(gw_a.double(), exact_weight, rtol=2**-8, atol=1e-3)
    if with_bias:
        torch.testing.assert_close(gb_k.double(), grad_rows.sum(0), rtol=0, atol=1e-4)
        torch.testing.assert_close(gb_a.double(), grad_rows.sum(0), rtol=2**-8, atol=1e-3)


@needs_kernel
def test_a_second_derivative_is_refused_not_silently_wrong():
    x = torch.randn(4, 32).to(torch.bfloat16).requires_grad_()
    weight = torch.randn(16, 32, requires_grad=True)
    with cpu_bf16():
        out = linear(x, weight)
    with pytest.raises(RuntimeError, match="create_graph=True.*cpu_kernels false"):
        torch.autograd.grad(out, x, torch.ones_like(out), create_graph=True)


@needs_kernel
def test_a_frozen_weights_bias_gradient_is_its_column_sums(monkeypatch):
    torch.manual_seed(4)
    x, grad_out = torch.randn(3, 5, 32).to(torch.bfloat16), torch.randn(3, 5, 16).to(torch.bfloat16)
    weight, bias = torch.randn(16, 32), torch.randn(16, requires_grad=True)
    monkeypatch.setattr(weight_gradient_kernel, "weight_gradient", lambda *args: pytest.fail("the weight's product ran"))
    with cpu_bf16():
        out = linear(x, weight, bias)
    out.backward(grad_out)
    assert out.grad_fn.name().endswith("KernelLinearBackward") and weight.grad is None
    torch.testing.assert_close(bias.grad.double(), grad_out.double().sum((0, 1)), rtol=0, atol=1e-5)


@needs_kernel
def test_tracing_falls_back_without_warnings():
    model = build_model("vit", patch_size=8, hidden_size=32, num_heads=2, num_blocks=1, dropout=0.0)
    with cpu_bf16(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.trace is deprecated; vitlab's export still meets it
        warnings.simplefilter("error", torch.jit.TracerWarning)
        traced = torch.jit.trace(model, torch.randn(2, 3, 32, 32), check_trace=False)
    assert "KernelLinear" not in str(traced.graph)


@needs_kernel
def test_only_the_gradients_asked_for_are_computed():
    torch.manual_seed(1)
    x = torch.randn(4, 32).to(torch.bfloat16)
    weight, bias = torch.randn(16, 32, requires_grad=True), torch.randn(16)  # the bias frozen
    with cpu_bf16():
        out = KernelLinear.apply(x, weight, bias)  # x without a gradient
    out.sum().backward()
    assert weight.grad is not None and x.grad is None and bias.grad is None
    frozen = torch.randn(16, 32)
    x_grad = x.clone().requires_grad_()
    with cpu_bf16():
        KernelLinear.apply(x_grad, frozen, None).sum().backward()
    assert x_grad.grad is not None and frozen.grad is None


def test_falls_back_to_f_linear_where_the_kernel_does_not_apply():
    x, weight = torch.randn(4, 32).to(torch.bfloat16), torch.randn(16, 32)
    assert not kernel_applies(x, weight)  # no autocast
    with cpu_bf16():
        assert not kernel_applies(x.float(), weight)  # fp32 input
        assert not kernel_applies(x, weight.to(torch.bfloat16))  # bf16 weights
        assert not kernel_applies(x[:, :24], weight[:, :24])  # a width the kernel does not take
        with torch.no_grad():
            assert not kernel_applies(x, weight)
        switch_kernels(False)
        try:
            assert not kernel_applies(x, weight)
            out = linear(x, weight)
        finally:
            switch_kernels(True)
        assert out.grad_fn is None or "KernelLinear" not in out.grad_fn.name()


@needs_kernel
def test_run_linear_calls_the_module_when_a_hook_or_a_replaced_forward_would_see_it():
    torch.manual_seed(2)
    layer, x = nn.Linear(32, 16), torch.randn(4, 32).to(torch.bfloat16)
    seen = []
    with cpu_bf16():
        assert run_linear(layer, x).grad_fn.name().endswith("KernelLinearBackward")
        handle = layer.register_forward_hook(lambda module, inputs, output: seen.append(output.shape))
        out = run_linear(layer, x)
        handle.remove()
    assert seen == [(4, 16)] and "KernelLinear" not in out.grad_fn.name()

    class Doubled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    doubled = Doubled(32, 16)
    with cpu_bf16():
        torch.testing.assert_close(run_linear(doubled, x), 2 * F.linear(x, doubled.weight, doubled.bias))


def count_nodes(node, name: str) -> int:
    seen, stack, count = set(), [node], 0
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        count += node.name().endswith(name)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return count


@needs_kernel
def test_a_vit_trains_its_linear_layers_through_the_kernel_and_its_gradients_match_the_operators():
    torch.manual_seed(3)
    model = build_model("vit", patch_size=4, hidden_size=64, num_heads=4, num_blocks=2, dropout=0.0)
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    gradients, kernel_nodes = {}, {}
    for kernels in (True, False):
        switch_kernels(kernels)
        try:
            model.zero_grad()
            with cpu_bf16(), blocks_as_separate_nodes():  # each linear layer a node of its own (a fused block is one)
                loss = F.cross_entropy(model(images), labels)
            kernel_nodes[kernels] = count_nodes(loss.grad_fn, "KernelLinearBackward")
            loss.backward()
        finally:
            switch_kernels(True)
        gradients[kernels] = {name: parameter.grad.clone() for name, parameter in model.named_parameters()}
    # the patch embedding; the first block's qkv, projection and two MLP layers; the last block's (it computes the CLS
    # token alone) query and key-value halves of qkv, projection and two MLP layers
    assert kernel_nodes == {True: 10, False: 0}
    for name, grad in gradients[True].items():
        # the same gradients to bf16's precision (the kernels round elsewhere too); not bit for bit
        torch.testing.assert_close(grad, gradients[False][name], rtol=0.05, atol=2e-3 * (1 + gradients[False][name].abs().max().item()))


@needs_kernel
def test_forward_and_input_gradient_run_through_the_matmul_kernel_with_the_same_bits_as_onednn(monkeypatch):
    from vitlab.kernels import matmul as matmul_kernel

    if not matmul_kernel.kernel_supports(64, 256):
        pytest.skip("the products stay with oneDNN on this machine (no AVX-512 BF16, or AMX)")
    torch.manual_seed(5)
    x, weight, bias = torch.randn(6, 65, 64).to(torch.bfloat16), torch.randn(256, 64) * 0.1, torch.randn(256)
    grad_out = torch.randn(6, 65, 256).to(torch.bfloat16)
    packs = []
    pack = matmul_kernel.pack_weight
    monkeypatch.setattr(matmul_kernel, "pack_weight", lambda weight, backward: packs.append(backward) or pack(weight, backward))
    results = {}
    for kernel in (True, False):
        monkeypatch.setattr(matmul_kernel, "kernel_supports", lambda i, o, kernel=kernel: kernel)
        x_ = x.clone().requires_grad_()
        with cpu_bf16():
            out = linear(x_, weight, bias)
        out.backward(grad_out)
        results[kernel] = (out, x_.grad)
    assert packs == [True]  # once, in the kernel's forward, with the input gradient's layout
    assert torch.equal(results[True][0], results[False][0]) and torch.equal(results[True][1], results[False][1])


@needs_kernel
@pytest.mark.parametrize("case", ["strided x with a bias", "a tiny product", "a deep sum"])
def test_where_the_matmul_kernel_would_round_otherwise_autocasts_product_runs(case):
    """PyTorch rounds a strided 3-d x's product before adding the bias, keeps bf16 subnormals in products of at most
    16³ multiply-adds, and sums depths beyond 512 in blocks: the same bits as autocast's F.linear there too."""
    torch.manual_seed(7)
    if case == "strided x with a bias":
        x, weight = torch.randn(8, 2, 16).to(torch.bfloat16).transpose(0, 1), torch.randn(16, 16)
    elif case == "a tiny product":
        x, weight = torch.randn(1, 16).to(torch.bfloat16), torch.randn(16, 16)
        x[0, 0], weight[:, 0] = float("inf"), 1e-39  # inf times a subnormal: inf in PyTorch, NaN where it counts as 0
    else:
        x, weight = torch.randn(64, 576).to(torch.bfloat16), torch.randn(64, 576)
    bias = torch.randn(16 if case != "a deep sum" else 64)
    grad_out = torch.randn(*x.shape[:-1], weight.shape[0]).to(torch.bfloat16)
    (out_a, gx_a, _, _), (out_k, gx_k, _, _) = autocast_and_kernel_gradients(x, weight, bias, grad_out)
    assert out_k.grad_fn.name().endswith("KernelLinearBackward")
    torch.testing.assert_close(out_k, out_a, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(gx_k, gx_a, rtol=0, atol=0, equal_nan=True)


def test_a_forward_replaced_on_the_layer_itself_runs_instead_of_the_fused_path():
    """run_linear only takes a layer's weight and bias itself when nothing replaced its forward, on the class or on
    the instance."""
    from vitlab.models.base import plain_linear

    layer = nn.Linear(4, 3)
    assert plain_linear(layer)
    layer.forward = lambda x: torch.zeros(x.shape[0], 3)
    assert not plain_linear(layer)
    assert torch.equal(run_linear(layer, torch.ones(2, 4)), torch.zeros(2, 3))
