import copy

import pytest
import torch
from torch import nn

from vitlab.kernels import build, switch_kernels
from vitlab.models import CNN, AirCNN, AirCNNConfig, CNNConfig, conv
from vitlab.models.conv import UnfoldedConv2d, run_conv, unfolded_weight_gradient, unfolding_pays

LAST = torch.channels_last
HAS_LIBRARY = build.compiled_library() is not None
needs_library = pytest.mark.skipif(not HAS_LIBRARY, reason="no C kernels on this machine (the path is switched with them)")


@pytest.fixture
def cpu_without_amx(monkeypatch):
    build.library_capabilities.cache_clear()
    monkeypatch.setattr(build, "cpu_has_amx", lambda: False)
    yield
    monkeypatch.undo()
    build.library_capabilities.cache_clear()


def counting_path(monkeypatch) -> list[tuple[int, ...]]:
    """Record the input shape of every convolution that runs unfolded."""
    calls = []
    apply = UnfoldedConv2d.apply
    monkeypatch.setattr(UnfoldedConv2d, "apply", lambda x, *rest: calls.append(tuple(x.shape)) or apply(x, *rest))
    return calls


def layer_step(layer: nn.Conv2d, x: torch.Tensor, grad_out: torch.Tensor, unfolded: bool) -> tuple[torch.Tensor, ...]:
    """(output, input gradient, weight gradient, bias gradient or None) of one bf16-autocast step of the layer whose
    output receives the gradient grad_out."""
    x = x.detach().clone().requires_grad_()
    layer.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = run_conv(layer, x) if unfolded else layer(x)
    out.backward(grad_out)
    return out.detach(), x.grad, layer.weight.grad, None if layer.bias is None else layer.bias.grad


def exact_step(layer: nn.Conv2d, x: torch.Tensor, grad_out: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """layer_step in float64 from x and the layer's parameters rounded to bf16, as autocast rounds them."""
    exact = copy.deepcopy(layer)
    with torch.no_grad():
        for parameter in exact.parameters():
            parameter.copy_(parameter.to(torch.bfloat16))
    exact.double()
    x = x.to(torch.bfloat16).double().requires_grad_()
    out = exact(x)
    out.backward(grad_out.double())
    return out.detach(), x.grad, exact.weight.grad, None if exact.bias is None else exact.bias.grad


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


def addressed_strides(tensor: torch.Tensor) -> list[int]:
    """The strides of the dimensions longer than 1."""
    return [stride for size, stride in zip(tensor.shape, tensor.stride(), strict=True) if size > 1]


LAYERS = [  # (in, out, kernel, padding, input side, bias)
    (256, 64, 3, 1, 4, False),  # the BN CNN's last stage (narrower)
    (64, 512, 3, 1, 2, False),  # wide: the input gradient sums over 9 × 512
    (32, 48, 3, "same", 3, True),  # cnn-fast's last convolution (narrower)
    (16, 24, 3, 1, 2, True),
    (8, 16, 5, 2, 4, False),
    (16, 8, 3, 0, 5, True),  # no padding: 3×3 out
    (12, 20, (3, 1), (1, 0), 4, True),
    (8, 8, 1, 0, 4, False),
]


@needs_library
@pytest.mark.parametrize("in_channels,out_channels,kernel,padding,side,bias", LAYERS)
@pytest.mark.parametrize("layout", [LAST, torch.contiguous_format])
def test_the_unfolded_layer_is_as_close_to_exact_as_onednns(in_channels, out_channels, kernel, padding, side, bias, layout,
                                                            amx_cpu, monkeypatch):
    """Output, input and weight gradients: bf16 roundings of fp32 sums added in another order, as near float64 as
    oneDNN's, in the layout oneDNN returns; bias gradient: fp32 sums, nearer than oneDNN's bf16."""
    torch.manual_seed(0)
    layer = nn.Conv2d(in_channels, out_channels, kernel, padding=padding, bias=bias).to(memory_format=layout)
    x = torch.randn(6, in_channels, side, side).contiguous(memory_format=layout)
    calls = counting_path(monkeypatch)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        shape = layer(x).shape
    grad_out = torch.randn(shape).to(torch.bfloat16).contiguous(memory_format=layout)
    unfolded = layer_step(layer, x, grad_out, True)
    assert calls == [tuple(x.shape)]
    plain = layer_step(layer, x, grad_out, False)
    assert len(calls) == 1
    exact = exact_step(layer, x, grad_out)
    assert unfolded[0].dtype == torch.bfloat16 and unfolded[0].shape == plain[0].shape
    assert unfolded[0].is_contiguous(memory_format=layout) and unfolded[1].is_contiguous(memory_format=layout)
    assert unfolded[1].dtype == torch.float32 and unfolded[1].shape == x.shape
    assert unfolded[2].dtype == torch.float32 and unfolded[2].shape == layer.weight.shape
    for index in (0, 1, 2):  # output, input gradient, weight gradient
        assert relative_error(unfolded[index], exact[index]) < 0.01
        assert relative_error(unfolded[index], exact[index]) <= 1.5 * relative_error(plain[index], exact[index]) + 1e-3
    if bias:
        assert unfolded[3].dtype == torch.float32
        assert relative_error(unfolded[3], exact[3]) <= relative_error(plain[3], exact[3]) + 1e-6


@pytest.mark.parametrize("layout", [LAST, torch.contiguous_format])
def test_the_unfolded_sums_are_the_convolutions_weight_gradient(layout):
    """In float64 the matmul gives the convolution's weight gradient to rounding, for any layout of either operand."""
    torch.manual_seed(1)
    layer = nn.Conv2d(5, 7, 3, padding=1, bias=False).double()
    x = torch.randn(3, 5, 4, 4, dtype=torch.float64).contiguous(memory_format=layout)
    grad_out = torch.randn(3, 7, 4, 4, dtype=torch.float64).contiguous(memory_format=layout)
    layer(x).backward(grad_out)
    assert torch.allclose(unfolded_weight_gradient(grad_out, x, (3, 3), (1, 1)), layer.weight.grad, atol=1e-12)


def plain_layer(**overrides) -> nn.Conv2d:
    settings = {"in_channels": 4, "out_channels": 6, "kernel_size": 3, "padding": 1, **overrides}
    return nn.Conv2d(**settings).to(memory_format=LAST)


def bf16_input(side: int = 4, channels: int = 4) -> torch.Tensor:
    return torch.randn(2, channels, side, side).to(torch.bfloat16).contiguous(memory_format=LAST)


def takes_path(layer: nn.Module, x: torch.Tensor, autocast: bool = True) -> bool:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        return unfolding_pays(layer, x)


@needs_library
def test_the_path_applies_to_small_maps_of_plain_stride_one_layers_only(amx_cpu):
    assert takes_path(plain_layer(), bf16_input(4))
    assert takes_path(plain_layer(padding="same"), bf16_input(3))
    assert takes_path(plain_layer(), bf16_input(4).float())  # fp32 input: autocast casts it
    assert not takes_path(plain_layer(), bf16_input(5))  # 25 output pixels
    assert not takes_path(plain_layer(padding=0), bf16_input(7)) and takes_path(plain_layer(padding=0), bf16_input(6))
    assert not takes_path(plain_layer(stride=2), bf16_input(4))
    assert not takes_path(plain_layer(dilation=2, padding=2), bf16_input(4))
    assert not takes_path(plain_layer(groups=2), bf16_input(4))
    assert not takes_path(plain_layer(padding_mode="reflect"), bf16_input(4))
    assert not takes_path(plain_layer(kernel_size=2, padding="same"), bf16_input(4))  # uneven "same" padding
    assert not takes_path(plain_layer(padding=3), bf16_input(1))  # more padding than the kernel covers
    assert not takes_path(plain_layer(padding=-1), bf16_input(6))  # the layer's own error, not a crop
    replaced = plain_layer()
    replaced.forward = lambda x: torch.zeros(())
    assert not takes_path(replaced, bf16_input(4))
    assert takes_path(plain_layer(padding=2), bf16_input(1))
    assert not takes_path(plain_layer(), bf16_input(4), autocast=False)
    assert not takes_path(plain_layer(), bf16_input(4, channels=3))  # the layer's own error, not ours
    assert not takes_path(plain_layer(), torch.zeros(0, 4, 4, 4, dtype=torch.bfloat16))
    hooked = plain_layer()
    hooked.register_forward_hook(lambda *args: None)
    assert not takes_path(hooked, bf16_input(4))

    class OwnConv(nn.Conv2d):
        pass

    assert not takes_path(OwnConv(4, 6, 3, padding=1), bf16_input(4))
    assert not takes_path(plain_layer().double(), bf16_input(4))
    with torch.no_grad():  # evaluation and prediction: the forward pays too
        assert takes_path(plain_layer(), bf16_input(4))


@needs_library
def test_the_path_is_off_without_amx_with_the_kernels_switched_off_and_while_compiling(cpu_without_amx, monkeypatch):
    assert not takes_path(plain_layer(), bf16_input(4))
    assert "small convolutions as matmuls" not in build.available_kernels(build.compiled_library())
    monkeypatch.setattr(build, "cpu_has_amx", lambda: True)
    build.library_capabilities.cache_clear()
    assert takes_path(plain_layer(), bf16_input(4))
    assert build.available_kernels(build.compiled_library()).endswith("small convolutions as matmuls")
    switch_kernels(False)
    try:
        assert not takes_path(plain_layer(), bf16_input(4))
    finally:
        switch_kernels(True)
    monkeypatch.setattr(conv, "recording_graph", lambda: True)
    assert not takes_path(plain_layer(), bf16_input(4))


@needs_library
def test_a_gradient_penalty_differentiates_the_path_again(amx_cpu):
    """backward(create_graph=True) through the path gives the second-order gradients the layer itself gives, through
    the input and the weight gradient both."""
    torch.manual_seed(2)
    layer = plain_layer(bias=True)
    x = torch.randn(3, 4, 4, 4).contiguous(memory_format=LAST)
    penalties = []
    for unfolded in (True, False):
        layer.zero_grad(set_to_none=True)
        inputs = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = run_conv(layer, inputs) if unfolded else layer(inputs)
        grad_x, grad_weight = torch.autograd.grad(out.float().square().sum(), (inputs, layer.weight), create_graph=True)
        (grad_x.square().sum() + grad_weight.square().sum()).backward()
        penalties.append((inputs.grad, layer.weight.grad))
    for got, expected in zip(*penalties, strict=True):
        assert relative_error(got, expected) < 0.02


@needs_library
@pytest.mark.parametrize("make,expected", [
    (lambda: CNN(CNNConfig(widths=(8, 16, 24, 32))), [(4, 24, 4, 4), (4, 32, 4, 4)]),  # the last stage, at 4×4
    (lambda: AirCNN(AirCNNConfig(widths=(16, 24, 32))), [(4, 32, 3, 3)]),  # the last group's second convolution
])
def test_the_cnns_send_their_small_maps_through_the_path_and_train_as_before(make, expected, amx_cpu, monkeypatch):
    """The same logits and gradients to bf16 rounding; gradients of the layers before the small maps keep their bits
    only where nothing after them changed, so all are compared by size."""
    torch.manual_seed(3)
    model = make().to(memory_format=LAST)
    images = torch.randn(4, 3, 32, 32).contiguous(memory_format=LAST)
    calls = counting_path(monkeypatch)
    results = []
    for unfolded in (True, False):
        with monkeypatch.context() as patch:
            if not unfolded:
                patch.setattr(conv, "unfolding_pays", lambda *args: False)
            model.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = model(images)
            logits.float().square().sum().backward()
        results.append([logits.detach(), *(p.grad for p in model.parameters() if p.grad is not None)])
    assert calls == expected
    unfolded, plain = results
    assert len(unfolded) == len(plain)
    for got, reference in zip(unfolded, plain, strict=True):
        assert relative_error(got, reference) < 0.05


@needs_library
@pytest.mark.parametrize("channels,input_layout,weight_layout", [
    (4, LAST, LAST), (4, torch.contiguous_format, LAST), (4, LAST, torch.contiguous_format),
    (4, torch.contiguous_format, torch.contiguous_format), (1, torch.contiguous_format, torch.contiguous_format),
])
def test_outputs_and_gradients_come_in_the_layouts_onednn_gives(channels, input_layout, weight_layout, amx_cpu):
    """Channels-last where the input or the weight is (a one-channel NCHW input is not), as oneDNN picks, for the
    output and both gradients (strides compared where a size is above 1: elsewhere they address nothing)."""
    torch.manual_seed(4)
    layer = nn.Conv2d(channels, 6, 3, padding=1).to(memory_format=weight_layout)
    x = torch.randn(2, channels, 4, 4).contiguous(memory_format=input_layout).requires_grad_()
    results = []
    for unfolded in (True, False):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = run_conv(layer, x) if unfolded else layer(x)
        results.append((out, *torch.autograd.grad(out.float().sum(), (x, layer.weight))))
    for got, expected in zip(*results, strict=True):
        assert got.dtype == expected.dtype and got.shape == expected.shape
        assert addressed_strides(got) == addressed_strides(expected)



@needs_library
def test_an_input_made_in_inference_mode_trains_through_the_path(amx_cpu, monkeypatch):
    """What backward keeps is the bf16 cast (as autocast keeps it), not the inference tensor itself."""
    layer = plain_layer()
    with torch.inference_mode():
        x = torch.randn(2, 4, 4, 4).contiguous(memory_format=LAST)
    calls = counting_path(monkeypatch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = run_conv(layer, x)
    out.float().sum().backward()
    assert calls == [tuple(x.shape)] and layer.weight.grad is not None
