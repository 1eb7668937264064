import copy

import pytest
import torch
from torch import nn

from vitlab.kernels import batch_norm as batch_norm_kernel
from vitlab.models import CNN, AirCNN, AirCNNConfig, CNNConfig, VisionTransformer, ViTConfig
from vitlab.models import batch_norm as batch_norm_module
from vitlab.models.batch_norm import KernelBatchNorm, run_batch_norm

LAST = torch.channels_last
SUPPORTED = batch_norm_kernel.kernel_supports(torch.zeros(2, 16, 1, 1, dtype=torch.bfloat16).contiguous(memory_format=LAST),
                                              None, None)
pytestmark = pytest.mark.skipif(not SUPPORTED, reason="no AVX-512 C kernels on this machine")


def counting_kernel(monkeypatch) -> list[tuple[tuple[int, ...], bool]]:
    """Record the input shape, and whether the ReLU was fused, of every BatchNorm the kernel runs."""
    calls = []
    apply = KernelBatchNorm.apply
    monkeypatch.setattr(KernelBatchNorm, "apply", lambda x, *rest: calls.append((tuple(x.shape), rest[-1])) or apply(x, *rest))
    return calls


def bf16_activations(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    return (torch.randn(shape) * 2 + 0.5).to(torch.bfloat16).contiguous(memory_format=LAST)


def close(got: torch.Tensor, expected: torch.Tensor, tolerance: float = 2e-2) -> bool:
    scale = expected.double().abs().max().clamp_min(1e-12)
    return ((got.double() - expected.double()).abs().max() / scale).item() <= tolerance


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("with_relu", [False, True])
def test_it_computes_and_updates_what_the_modules_do(momentum, with_relu, monkeypatch):
    calls = counting_kernel(monkeypatch)
    norm = nn.BatchNorm2d(32, momentum=momentum)
    nn.init.normal_(norm.weight)
    nn.init.normal_(norm.bias)
    modules = copy.deepcopy(norm)
    relu = nn.ReLU(inplace=True) if with_relu else None
    for seed in range(3):  # three batches: the running estimates move each time
        x = bf16_activations((8, 32, 5, 5), seed).requires_grad_()
        y = run_batch_norm(norm, x, relu)
        x_modules = x.detach().clone().requires_grad_()
        y_modules = modules(x_modules)
        y_modules = torch.relu(y_modules) if with_relu else y_modules
        grad_out = torch.randn(y.shape).to(torch.bfloat16)
        y.backward(grad_out)
        y_modules.backward(grad_out)
        assert close(y, y_modules) and close(x.grad, x_modules.grad)
        assert y.is_contiguous(memory_format=LAST) and x.grad.is_contiguous(memory_format=LAST)
    assert len(calls) == 3 and all(fused == with_relu for _, fused in calls)
    assert norm.num_batches_tracked.item() == modules.num_batches_tracked.item() == 3
    for buffer, expected in ((norm.running_mean, modules.running_mean), (norm.running_var, modules.running_var)):
        assert torch.allclose(buffer, expected, rtol=1e-5, atol=1e-6)
    for parameter, expected in ((norm.weight, modules.weight), (norm.bias, modules.bias)):
        assert close(parameter.grad, expected.grad, tolerance=1e-2)  # PyTorch's may be rounded to bf16, the kernel's are not


def test_without_running_estimates_it_normalises_by_the_batch_alone(monkeypatch):
    calls = counting_kernel(monkeypatch)
    norm = nn.BatchNorm2d(16, affine=False, track_running_stats=False)
    x = bf16_activations((4, 16, 3, 3))
    assert close(run_batch_norm(norm, x), norm(x)) and len(calls) == 1
    assert norm.running_mean is None and norm.weight is None


@pytest.mark.parametrize("case", ["eval mode", "a hook", "a forward set on the instance", "NCHW memory", "24 channels",
                                  "a subclass", "a ReLU with a hook", "forward-mode AD"])
def test_what_the_kernel_does_not_take_runs_the_modules(case, monkeypatch):
    calls = counting_kernel(monkeypatch)
    norm, relu = nn.BatchNorm2d(16), nn.ReLU()
    x = bf16_activations((4, 16, 3, 3))
    seen = []
    if case == "eval mode":
        norm.eval()
    elif case == "a hook":
        norm.register_forward_hook(lambda module, inputs, output: seen.append(output.shape))
    elif case == "a forward set on the instance":
        norm.forward = lambda t: seen.append(t.shape) or t * 0
    elif case == "NCHW memory":
        x = x.contiguous()
    elif case == "24 channels":
        norm, x = nn.BatchNorm2d(24), bf16_activations((4, 24, 3, 3))
    elif case == "a subclass":
        norm = type("MyNorm", (nn.BatchNorm2d,), {})(16)
    elif case == "a ReLU with a hook":
        relu.register_forward_hook(lambda module, inputs, output: seen.append(output.shape))
    expected = torch.relu(copy.deepcopy(norm)(x)) if case != "a forward set on the instance" else x * 0
    seen.clear()
    if case == "forward-mode AD":
        import torch.autograd.forward_ad as forward_ad

        with forward_ad.dual_level():
            got = run_batch_norm(norm, x, relu)
    else:
        got = run_batch_norm(norm, x, relu)
    assert calls == []
    assert close(got, expected)
    if case in ("a hook", "a forward set on the instance", "a ReLU with a hook"):
        assert len(seen) == 1


def test_a_non_positive_eps_is_left_to_the_module_which_refuses_it(monkeypatch):
    calls = counting_kernel(monkeypatch)
    for eps in (0.0, -0.5):
        with pytest.raises(ValueError, match="eps"):
            run_batch_norm(nn.BatchNorm2d(16, eps=eps), bf16_activations((4, 16, 3, 3)), nn.ReLU())
    assert calls == []


@pytest.mark.parametrize("momentum", [0.1, None])
def test_without_a_batch_count_it_updates_as_the_module(momentum, monkeypatch):
    calls = counting_kernel(monkeypatch)
    norm = nn.BatchNorm2d(16, momentum=momentum)
    norm.num_batches_tracked = None
    modules = copy.deepcopy(norm)
    x = bf16_activations((4, 16, 3, 3))
    run_batch_norm(norm, x)
    modules(x)
    assert len(calls) == 1 and norm.num_batches_tracked is None
    assert torch.allclose(norm.running_mean, modules.running_mean, rtol=1e-5, atol=1e-6)
    assert torch.allclose(norm.running_var, modules.running_var, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("last_in_segment", [True, False])
def test_a_checkpoints_recompute_updates_the_running_estimates_as_the_modules(last_in_segment, monkeypatch):
    """A non-reentrant checkpoint recomputes its segment up to the last tensor it saved; the module's estimates move
    again in that recompute (inside the operation), and so must the kernel's."""
    from torch.utils.checkpoint import checkpoint

    calls = counting_kernel(monkeypatch)
    counts = []
    for fused in (True, False):
        norm = nn.BatchNorm2d(16)
        relu = nn.ReLU()

        def segment(t, norm=norm, relu=relu, fused=fused):
            y = run_batch_norm(norm, t, relu) if fused else relu(norm(t))
            return y if last_in_segment else y * y

        x = bf16_activations((4, 16, 3, 3)).requires_grad_()
        checkpoint(segment, x, use_reentrant=False).float().sum().backward()
        counts.append((norm.num_batches_tracked.item(), norm.running_mean.clone()))
    assert len(calls) == 2
    assert counts[0][0] == counts[1][0] == 2
    assert torch.allclose(counts[0][1], counts[1][1], rtol=1e-3, atol=1e-4)


def test_a_gradient_penalty_differentiates_through_it_as_through_the_modules():
    norm = nn.BatchNorm2d(16)
    nn.init.normal_(norm.weight)
    results = []
    for fused in (True, False):
        norm.zero_grad()
        x = bf16_activations((4, 16, 4, 4), seed=7).requires_grad_()
        y = run_batch_norm(norm, x, nn.ReLU()) if fused else torch.relu(norm(x))
        (grad_x,) = torch.autograd.grad(y.float().square().sum(), x, create_graph=True)
        grad_x.float().square().sum().backward()
        results.append([grad_x.detach(), x.grad, norm.weight.grad, norm.bias.grad])
    for got, expected in zip(*results, strict=True):
        assert close(got, expected, tolerance=5e-2)


def train_step(model: nn.Module, images: torch.Tensor, fused: bool, monkeypatch) -> list[torch.Tensor]:
    """Logits and every parameter's gradient of one channels-last bf16 autocast step, BatchNorm by the kernel or not."""
    with monkeypatch.context() as patch:
        if not fused:
            patch.setattr(batch_norm_module, "kernel_applies", lambda *args: False)
            patch.setattr("vitlab.models.pooling.batch_norm_kernel_applies", lambda *args: False)
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(images)
        logits.float().square().sum().backward()
    return [logits.detach(), *(parameter.grad for parameter in model.parameters() if parameter.grad is not None)]


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.double() - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize(("make", "norms"), [
    (lambda: CNN(CNNConfig(widths=(16, 32))), 4),
    (lambda: AirCNN(AirCNNConfig(widths=(16, 32, 32))), 6),
    (lambda: VisionTransformer(ViTConfig(stem="conv-pool", patch_size=4, hidden_size=64, num_heads=2, num_blocks=1)), 2),  # CCT's tokenizer
])
def test_the_cnns_train_through_it_as_close_to_float64_as_through_their_modules(make, norms, monkeypatch):
    torch.manual_seed(0)
    model = make().to(memory_format=LAST)
    images = torch.randn(8, 3, 32, 32).contiguous(memory_format=LAST)
    calls = counting_kernel(monkeypatch)
    fused_model, exact_model = copy.deepcopy(model), copy.deepcopy(model).double()
    fused = train_step(fused_model, images, True, monkeypatch)
    assert len(calls) == norms  # every BatchNorm: the CNN's with its ReLU, aircnn's (GELU after) without
    assert all(fused_relu == (not isinstance(model, AirCNN)) for _, fused_relu in calls)
    plain = train_step(model, images, False, monkeypatch)
    assert len(calls) == norms
    exact_logits = exact_model(images.double())
    exact_logits.square().sum().backward()
    exact = [exact_logits.detach(), *(p.grad for p in exact_model.parameters() if p.grad is not None)]
    for got, theirs, expected in zip(fused, plain, exact, strict=True):
        assert relative_error(got, expected) <= 1.5 * relative_error(theirs, expected) + 1e-2
    for name, buffer in fused_model.named_buffers():
        expected = dict(exact_model.named_buffers())[name].double()
        assert relative_error(buffer, expected) <= 1.5 * relative_error(dict(model.named_buffers())[name], expected) + 1e-3
