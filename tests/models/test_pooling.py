import copy

import pytest
import torch
from torch import nn

from vitlab.kernels import pool as pool_kernel
from vitlab.models import CNN, CNNConfig, SmallCNN, pooling
from vitlab.models.pooling import KernelReLUMaxPool, fusable_pool, run_layers

LAST = torch.channels_last
SUPPORTED = pool_kernel.kernel_supports(torch.zeros(1, 1, 2, 2, dtype=torch.bfloat16).contiguous(memory_format=LAST))


def counting_kernel(monkeypatch) -> list[tuple[int, ...]]:
    """Record the shape of every input the fused path takes."""
    calls = []
    apply = KernelReLUMaxPool.apply
    monkeypatch.setattr(pooling.KernelMaxPool, "apply", pooling.KernelMaxPool.apply)  # a lone pool: not counted
    monkeypatch.setattr(KernelReLUMaxPool, "apply", lambda x: calls.append(tuple(x.shape)) or apply(x))
    return calls


def train_step(model: nn.Module, images: torch.Tensor, fused: bool, monkeypatch, autocast: bool = True) -> list[torch.Tensor]:
    """Logits and every parameter's gradient of one channels-last step (bf16 autocast or fp32), fused or by the modules."""
    with monkeypatch.context() as patch:
        if not fused:
            patch.setattr(pool_kernel, "kernel_supports", lambda *args: False)
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = model(images)
        logits.float().square().sum().backward()
    return [logits.detach(), *(parameter.grad for parameter in model.parameters())]


@pytest.mark.skipif(not SUPPORTED, reason="no AVX-512 C kernels on this machine")
@pytest.mark.parametrize("make", [SmallCNN, lambda: CNN(CNNConfig(widths=(16, 32)))])
@pytest.mark.parametrize("autocast", [True, False])
def test_the_cnns_train_bit_for_bit_as_their_modules_with_the_kernel(make, autocast, monkeypatch):
    """Both stages' ReLU and pool in the kernel; for the BN CNN under autocast, whose ReLUs go with the BatchNorm
    kernel (in both runs), the pools alone."""
    torch.manual_seed(0)
    model = make().to(memory_format=LAST)
    images = torch.randn(8, 3, 32, 32).contiguous(memory_format=LAST)
    calls = counting_kernel(monkeypatch)
    lone = []
    apply_alone = pooling.KernelMaxPool.apply
    monkeypatch.setattr(pooling.KernelMaxPool, "apply", lambda x: lone.append(tuple(x.shape)) or apply_alone(x))
    fused = train_step(model, images, True, monkeypatch, autocast)
    assert (len(calls), len(lone)) == ((0, 2) if isinstance(model, CNN) and autocast else (2, 0))
    plain = train_step(model, images, False, monkeypatch, autocast)
    assert len(calls) + len(lone) == 2
    for got, expected in zip(fused, plain, strict=True):
        assert torch.equal(got, expected)


def test_nchw_memory_fp64_a_hook_or_another_pool_runs_the_modules(monkeypatch):
    calls = counting_kernel(monkeypatch)
    model = SmallCNN()
    images = torch.randn(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(images)  # NCHW memory
    model.double()(images.double().contiguous(memory_format=LAST))
    model.float()
    hooked = copy.deepcopy(model).to(memory_format=LAST)
    seen = []
    hooked.features[2].register_forward_hook(lambda module, inputs, output: seen.append(output.shape))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hooked(images.contiguous(memory_format=LAST))
    assert seen == [(2, 16, 16, 16)]  # the hooked stage ran its modules
    assert len(calls) == (1 if SUPPORTED else 0)  # the other stage was fused
    layers = nn.Sequential(nn.ReLU(), nn.MaxPool2d(2))
    layers.register_forward_hook(lambda module, inputs, output: seen.append("sequential"))
    run_layers(layers, torch.randn(1, 4, 4, 4).to(torch.bfloat16).contiguous(memory_format=LAST))
    assert seen[-1] == "sequential" and len(calls) == (1 if SUPPORTED else 0)


@pytest.mark.parametrize("pool, fusable", [
    (nn.MaxPool2d(2), True), (nn.MaxPool2d((2, 2), stride=2), True), (nn.MaxPool2d(3), False),
    (nn.MaxPool2d(2, stride=1), False), (nn.MaxPool2d(2, padding=1), False), (nn.MaxPool2d(2, ceil_mode=True), False),
    (nn.MaxPool2d(2, dilation=2), False), (nn.MaxPool2d(2, return_indices=True), False), (nn.AvgPool2d(2), False),
])
def test_only_a_plain_two_by_two_max_pool_is_fused(pool, fusable):
    assert fusable_pool(pool) is fusable


@pytest.mark.skipif(not SUPPORTED, reason="no AVX-512 C kernels on this machine")
def test_run_layers_fuses_only_a_relu_directly_before_the_pool(monkeypatch):
    calls = counting_kernel(monkeypatch)
    x = torch.randn(2, 16, 8, 8).to(torch.bfloat16).contiguous(memory_format=LAST)
    run_layers(nn.Sequential(nn.ReLU(), nn.Identity(), nn.MaxPool2d(2)), x)
    run_layers(nn.Sequential(nn.GELU(), nn.MaxPool2d(2)), x)
    assert calls == []
    out = run_layers(nn.Sequential(nn.Identity(), nn.ReLU(inplace=True), nn.MaxPool2d(2), nn.Flatten()), x)
    assert calls == [(2, 16, 8, 8)] and out.shape == (2, 16 * 16)
    assert torch.equal(out, torch.nn.functional.max_pool2d(torch.relu(x), 2).flatten(1))


@pytest.mark.skipif(not SUPPORTED, reason="no AVX-512 C kernels on this machine")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("size", [(6, 6), (7, 5)])
def test_a_gradient_penalty_differentiates_through_it_as_through_the_modules(dtype, size):
    torch.manual_seed(5)
    x = torch.randn(2, 16, *size).to(dtype).contiguous(memory_format=LAST)
    weights = torch.randn(2, 16, size[0] // 2, size[1] // 2).to(dtype)
    probe = torch.randn(2, 16, *size).to(dtype)
    results = []
    for pool in (KernelReLUMaxPool.apply, lambda t: torch.nn.functional.max_pool2d(torch.relu(t), 2)):
        inputs, scale = x.clone().requires_grad_(), weights.clone().requires_grad_()
        (grad,) = torch.autograd.grad((pool(inputs) * scale).sum(), inputs, create_graph=True)
        (grad * probe).sum().backward()  # a penalty on the input gradient: its gradient reaches `scale`
        results.append((grad.detach(), scale.grad))
    (kernel_grad, kernel_second), (torch_grad, torch_second) = results
    assert torch.equal(kernel_grad, torch_grad) and torch.equal(kernel_second, torch_second)


def test_transforms_and_tracers_that_cannot_see_into_c_run_the_modules(monkeypatch):
    calls = counting_kernel(monkeypatch)
    torch.manual_seed(6)
    model = SmallCNN().to(memory_format=LAST)
    images = torch.randn(2, 3, 32, 32).contiguous(memory_format=LAST)
    inputs = images.clone().requires_grad_()
    model(inputs).sum().backward()
    calls.clear()
    # torch.func's grad and vmap, forward-mode AD, FX's symbolic tracing and fake tensors
    assert torch.allclose(torch.func.grad(lambda i: model(i).sum())(images), inputs.grad)
    assert torch.func.vmap(lambda i: model(i[None])[0])(images).shape == (2, 10)
    assert torch.func.jvp(model, (images,), (torch.ones_like(images),))[1].shape == (2, 10)
    traced = torch.fx.symbolic_trace(SmallCNN())
    assert traced(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        assert model(images).shape == (2, 10)
    assert calls == []


def test_the_operators_have_shapes_for_meta_tensors():
    x = torch.empty(2, 16, 7, 6, device="meta").contiguous(memory_format=LAST)
    out, position = torch.ops.vitlab.relu_max_pool2d(x)
    assert out.shape == position.shape == (2, 16, 3, 3) and position.dtype == torch.uint8
    assert out.is_contiguous(memory_format=LAST)
    grad_x = torch.ops.vitlab.relu_max_pool2d_backward(out, position, 7, 6)
    assert grad_x.shape == (2, 16, 7, 6) and grad_x.device.type == "meta"


def test_a_relu_or_pool_whose_forward_was_replaced_on_the_instance_is_not_fused():
    relu, pool = nn.ReLU(), nn.MaxPool2d(2)
    x = torch.randn(1, 2, 4, 4).to(torch.bfloat16).contiguous(memory_format=LAST)
    fusable = pooling.kernel_applies(relu, pool, x)
    relu.forward = lambda t: t
    assert not pooling.kernel_applies(relu, pool, x)
    relu, pool = nn.ReLU(), nn.MaxPool2d(2)
    pool.forward = lambda t: t
    assert not fusable_pool(pool) and not pooling.kernel_applies(relu, pool, x)
    assert fusable == SUPPORTED


@pytest.mark.skipif(not SUPPORTED, reason="no AVX-512 C kernels on this machine")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("side", [2, 3, 7, 8, 15, 31])
def test_a_lone_max_pool_gives_the_modules_values_and_gradients_bit_for_bit(dtype, side, monkeypatch):
    """Ties (the first wins), NaN (the last wins), -0 and odd sides (the last row and column get no gradient), as
    nn.MaxPool2d."""
    torch.manual_seed(side)
    x = torch.randn(3, 20, side, side).round().to(dtype)  # rounding makes ties common
    x[0, 0, 0, 0] = float("nan")
    x[1, 2, :2, :2] = -0.0
    x = x.contiguous(memory_format=LAST)
    calls = []
    apply = pooling.KernelMaxPool.apply
    monkeypatch.setattr(pooling.KernelMaxPool, "apply", lambda t: calls.append(t.shape) or apply(t))
    grad = torch.randn(3, 20, side // 2, side // 2).to(dtype)
    results = []
    for fused in (True, False):
        inputs = x.clone().requires_grad_()
        out = pooling.run_pool(nn.MaxPool2d(2), inputs) if fused else nn.MaxPool2d(2)(inputs)
        out.backward(grad)
        results.append((out.detach(), inputs.grad))
    assert len(calls) == 1
    (out, grad_x), (expected_out, expected_grad) = results
    assert torch.equal(out.isnan(), expected_out.isnan()) and torch.equal(out.nan_to_num(), expected_out.nan_to_num())
    assert torch.equal(grad_x, expected_grad) and out.is_contiguous(memory_format=LAST)


@pytest.mark.skipif(not SUPPORTED, reason="no AVX-512 C kernels on this machine")
def test_aircnn_pools_through_the_kernel_and_trains_bit_for_bit_as_its_modules(monkeypatch):
    from vitlab.models import AirCNN, AirCNNConfig

    torch.manual_seed(5)
    model = AirCNN(AirCNNConfig(widths=(16, 24, 32))).to(memory_format=LAST)
    images = torch.randn(4, 3, 32, 32).contiguous(memory_format=LAST)
    calls = []
    apply = pooling.KernelMaxPool.apply
    monkeypatch.setattr(pooling.KernelMaxPool, "apply", lambda t: calls.append(tuple(t.shape[2:])) or apply(t))
    results = []
    for fused in (True, False):
        with monkeypatch.context() as patch:
            if not fused:
                patch.setattr(pool_kernel, "kernel_supports", lambda x: False)
            model.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = model(images)
            logits.float().square().sum().backward()
        results.append([logits.detach(), *(p.grad for p in model.parameters() if p.grad is not None)])
    assert calls == [(31, 31), (15, 15), (7, 7)]  # one pool per group
    for got, expected in zip(*results, strict=True):
        assert torch.equal(got, expected)


@pytest.mark.skipif(not SUPPORTED, reason="no AVX-512 C kernels on this machine")
@pytest.mark.parametrize("fused", ["relu", "alone"])
def test_a_negative_zero_gradient_lands_as_positive_zero_under_create_graph_too(fused):
    """PyTorch adds each routed gradient to zeros, so -0 arrives as +0; the differentiable routing does the same."""
    x = torch.tensor([[[[1.0, 2.0], [0.5, 0.0]]]]).contiguous(memory_format=LAST).requires_grad_()
    out = KernelReLUMaxPool.apply(x) if fused == "relu" else pooling.KernelMaxPool.apply(x)
    (grad_x,) = torch.autograd.grad(out, x, torch.tensor([[[[-0.0]]]]), create_graph=True)
    assert grad_x[0, 0, 0, 1].item() == 0.0 and not torch.signbit(grad_x).any()


def test_a_zero_stride_is_left_to_the_module_which_refuses_it():
    pool = nn.MaxPool2d(2, stride=0)
    assert not fusable_pool(pool)
    with pytest.raises(RuntimeError, match="stride"):
        pooling.run_pool(pool, torch.randn(1, 2, 4, 4).to(torch.bfloat16).contiguous(memory_format=LAST))
    assert fusable_pool(nn.MaxPool2d(2, stride=[])) and fusable_pool(nn.MaxPool2d(2))


def test_a_feature_stack_whose_forward_was_replaced_runs_that_forward():
    layers = nn.Sequential(nn.ReLU(), nn.MaxPool2d(2))
    layers.forward = lambda t: t * 0
    x = torch.randn(1, 2, 4, 4).to(torch.bfloat16).contiguous(memory_format=LAST)
    assert torch.equal(run_layers(layers, x), x * 0)
