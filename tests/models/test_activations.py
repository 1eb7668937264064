import torch
import torch.nn.functional as F
from torch import nn

from vitlab.kernels import gelu as gelu_kernel
from vitlab.models.activations import GELU
from vitlab.models.base import has_hooks


def test_bf16_activations_get_pytorchs_gelu_and_gradient_within_bf16_rounding():
    torch.manual_seed(0)
    x = (torch.randn(4, 9, 64) * 2).to(torch.bfloat16)
    grad = torch.randn(4, 9, 64).to(torch.bfloat16)
    results = []
    for module in (GELU(), nn.GELU()):
        inputs = x.clone().requires_grad_()
        out = module(inputs)
        out.backward(grad)
        results.append((out, inputs.grad))
    (kernel_out, kernel_grad), (torch_out, torch_grad) = results
    assert kernel_out.dtype == kernel_grad.dtype == torch.bfloat16
    torch.testing.assert_close(kernel_out.float(), torch_out.float(), rtol=2**-7, atol=1e-5)
    torch.testing.assert_close(kernel_grad.float(), torch_grad.float(), rtol=2**-6, atol=1e-3)  # the kernel rounds the gradient twice


def test_fp32_inputs_a_hook_or_the_tanh_form_use_nn_gelu(monkeypatch):
    calls = []
    monkeypatch.setattr(gelu_kernel, "gelu_forward", lambda *args: calls.append(args) or (_ for _ in ()).throw(AssertionError))
    x = torch.randn(3, 5)
    assert torch.equal(GELU()(x), F.gelu(x))
    assert torch.equal(GELU(approximate="tanh")(x.to(torch.bfloat16)), F.gelu(x.to(torch.bfloat16), approximate="tanh"))
    hooked = GELU()
    handle = hooked.register_forward_hook(lambda module, inputs, output: None)
    assert has_hooks(hooked) and not has_hooks(GELU())
    assert torch.equal(hooked(x.to(torch.bfloat16)), F.gelu(x.to(torch.bfloat16)))
    handle.remove()
    assert not calls


def test_the_vit_mlp_uses_it():
    from vitlab.models import build_model

    model = build_model("vit", patch_size=8, hidden_size=32, num_heads=2, num_blocks=1)
    assert isinstance(model.blocks[0].mlp[1], GELU) and isinstance(model.blocks[0].mlp[1], nn.GELU)


def mlps(hidden: int = 64):
    from vitlab.models.activations import MLP
    from vitlab.models.dropout import Dropout

    torch.manual_seed(0)
    fused = MLP(32, hidden, GELU(), Dropout(0.0), Dropout(0.0))
    for parameter in fused.parameters():
        nn.init.normal_(parameter, std=0.3)
    plain = nn.Sequential(*(nn.Linear(32, hidden), nn.GELU(), nn.Identity(), nn.Linear(hidden, 32), nn.Identity()))
    plain.load_state_dict(fused.state_dict())  # the same parameter names as the nn.Sequential it replaced
    return fused, plain


def test_the_mlp_hands_its_first_bias_to_the_kernel_and_matches_nn_sequential(monkeypatch):
    fused, plain = mlps()
    calls = []
    forward = gelu_kernel.gelu_forward
    monkeypatch.setattr(gelu_kernel, "gelu_forward", lambda x, bias=None: calls.append(bias) or forward(x, bias))
    x = torch.randn(4, 9, 32)
    results = []
    for module in (fused, plain):
        inputs = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = module(inputs)
        out.float().square().sum().backward()
        results.append((out, inputs.grad, *(p.grad for p in module.parameters())))
    if gelu_kernel.kernel_supports(torch.zeros(1, 64, dtype=torch.bfloat16), torch.zeros(64)):
        assert len(calls) == 1 and calls[0] is fused[0].bias
    for got, expected in zip(*results, strict=True):
        torch.testing.assert_close(got.float(), expected.float(), rtol=0.02, atol=0.02 * expected.abs().max().item())


def test_the_mlp_without_autocast_with_a_hook_or_relu_is_nn_sequential():
    fused, plain = mlps()
    x = torch.randn(3, 32)
    assert torch.equal(fused(x), plain(x))  # fp32: no kernel, the bias in the first layer
    handle = fused[0].register_forward_hook(lambda module, inputs, output: None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(fused(x), plain(x))
    handle.remove()


def test_a_forward_replaced_on_the_gelu_keeps_the_bias_with_its_linear_layer():
    """A GELU whose forward was replaced on the instance runs that forward, so it cannot add the linear layer's bias."""
    gelu, linear = GELU(), nn.Linear(16, 32)
    x = torch.randn(4, 16).to(torch.bfloat16)
    takes = gelu.takes_bias_of(linear, x)
    gelu.forward = lambda t: t
    assert not gelu.takes_bias_of(linear, x)
    assert takes == gelu_kernel.adds_bias(32, linear.bias)
