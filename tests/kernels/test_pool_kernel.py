import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from vitlab.kernels import pool as pool_kernel

LAST = torch.channels_last
SUPPORTED = pool_kernel.kernel_supports(torch.zeros(1, 1, 2, 2, dtype=torch.bfloat16).contiguous(memory_format=LAST))
pytestmark = pytest.mark.skipif(not SUPPORTED, reason="no AVX-512 C kernels on this machine")


def pytorch_pair(x: torch.Tensor, grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(max_pool2d(relu(x), 2), x's gradient) by PyTorch's operators."""
    x = x.detach().clone().requires_grad_()
    out = F.max_pool2d(torch.relu(x), 2)
    out.backward(grad_out)
    return out.detach(), x.grad


def kernel_pair(x: torch.Tensor, grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out, position = torch.ops.vitlab.relu_max_pool2d(x)
    return out, torch.ops.vitlab.relu_max_pool2d_backward(grad_out, position, x.shape[2], x.shape[3])


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous(memory_format=LAST).view(torch.int16 if tensor.dtype == torch.bfloat16 else torch.int32)


@pytest.mark.parametrize("shape", [(128, 16, 32, 32), (2, 32, 16, 16), (3, 20, 7, 9), (1, 5, 2, 2), (4, 33, 5, 6), (2, 1, 3, 2)])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_bit_for_bit_pytorch_relu_then_max_pool(shape, threads, dtype):
    torch.manual_seed(shape[1] + threads)
    x = torch.randn(shape).to(dtype).contiguous(memory_format=LAST)
    x[..., :2, :2][:, ::3] = x[..., :1, :1][:, ::3]  # ties: a window's four values equal in every third channel
    x[-1, -1] = -x[-1, -1].abs()  # a channel whose windows are all negative
    grad_out = torch.randn(shape[0], shape[1], shape[2] // 2, shape[3] // 2).to(dtype)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out, grad_x = kernel_pair(x, grad_out)
    finally:
        torch.set_num_threads(previous)
    expected_out, expected_grad = pytorch_pair(x, grad_out)
    assert out.is_contiguous(memory_format=LAST) and grad_x.is_contiguous(memory_format=LAST)
    assert out.dtype == grad_x.dtype == dtype
    assert torch.equal(bits(out), bits(expected_out)) and torch.equal(bits(grad_x), bits(expected_grad))


def test_the_first_of_tied_maxima_takes_the_gradient_and_relu_stops_it_at_zero():
    x = torch.tensor([[0.5, 0.5], [0.5, 0.25]]).reshape(1, 1, 2, 2).repeat(1, 3, 1, 1)
    x[0, 1] = torch.tensor([[-1.0, -2.0], [-0.0, -3.0]])  # all ReLU'd to 0: no gradient anywhere
    x[0, 2] = torch.tensor([[0.0, 1.0], [2.0, 2.0]])  # the first 2 (bottom left) wins
    x = x.to(torch.bfloat16).contiguous(memory_format=LAST)
    out, grad_x = kernel_pair(x, torch.full((1, 3, 1, 1), 3.0, dtype=torch.bfloat16))
    assert out.flatten().tolist() == [0.5, 0.0, 2.0]
    assert grad_x[0, 0].flatten().tolist() == [3.0, 0.0, 0.0, 0.0]
    assert grad_x[0, 1].flatten().tolist() == [0.0] * 4
    assert grad_x[0, 2].flatten().tolist() == [0.0, 0.0, 3.0, 0.0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_nan_wins_its_window_and_passes_its_gradient_as_pytorch_does(dtype):
    torch.manual_seed(0)
    x = torch.randn(2, 17, 4, 4).to(dtype).contiguous(memory_format=LAST)
    x[0, 0, 0, 1] = x[0, 3, 1, 1] = x[1, 16, 2, 2] = x[1, 16, 3, 3] = float("nan")  # the last: two NaNs in one window
    x[0, 5, 0, 0] = float("inf")
    grad_out = torch.randn(2, 17, 2, 2).to(dtype)
    grad_out[0, 0, 0, 0] = float("nan")
    grad_out[1, 2, 1, 1] = -0.0
    out, grad_x = kernel_pair(x, grad_out)
    expected_out, expected_grad = pytorch_pair(x, grad_out)
    # the same values and the same NaN positions (NaN's bits differ: PyTorch's ReLU writes its own NaN)
    assert torch.equal(out.isnan(), expected_out.isnan()) and torch.equal(grad_x.isnan(), expected_grad.isnan())
    assert torch.equal(bits(out.nan_to_num(7.0)), bits(expected_out.nan_to_num(7.0)))
    assert torch.equal(bits(grad_x.nan_to_num(7.0)), bits(expected_grad.nan_to_num(7.0)))


def test_positions_name_the_window_place_or_no_gradient():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 1, 2, 2).repeat(1, 5, 1, 1)
    for channel, place in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        x[0, channel, place[0], place[1]] = 9.0
    x[0, 4] = -x[0, 4]
    _, position = torch.ops.vitlab.relu_max_pool2d(x.to(torch.bfloat16).contiguous(memory_format=LAST))
    assert position.dtype == torch.uint8 and position.flatten().tolist() == [0, 1, 2, 3, pool_kernel.NO_GRADIENT]


def test_the_operators_are_seen_by_dispatch_modes_with_their_tensors():
    seen = []

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append((func.name(), [a.shape for a in args if isinstance(a, torch.Tensor)]))
            return func(*args, **(kwargs or {}))

    x = torch.randn(2, 16, 4, 4).to(torch.bfloat16).contiguous(memory_format=LAST)
    with Recorder():
        out, position = torch.ops.vitlab.relu_max_pool2d(x)
        torch.ops.vitlab.relu_max_pool2d_backward(out, position, 4, 4)
    names = [name for name, _ in seen]
    assert "vitlab::relu_max_pool2d" in names and "vitlab::relu_max_pool2d_backward" in names


@pytest.mark.parametrize("x, problem", [
    (torch.zeros(1, 16, 4, 4, dtype=torch.bfloat16), "NCHW memory"),
    (torch.zeros(1, 16, 4, 4, dtype=torch.float16).contiguous(memory_format=LAST), "fp16"),
    (torch.zeros(1, 16, 4, 4, dtype=torch.float64).contiguous(memory_format=LAST), "fp64"),
    (torch.zeros(1, 16, 1, 4, dtype=torch.bfloat16).contiguous(memory_format=LAST), "height 1"),
    (torch.zeros(16, 4, 4, dtype=torch.bfloat16), "3-D"),
    (torch.zeros(0, 16, 4, 4, dtype=torch.bfloat16).contiguous(memory_format=LAST), "empty batch"),
    (torch.ones(1, 16, 4, 4, dtype=torch.bfloat16).contiguous(memory_format=LAST)._neg_view(), "a negated view"),
])
def test_inputs_it_does_not_take_are_refused(x, problem):
    assert not pool_kernel.kernel_supports(x), problem
    with pytest.raises(ValueError, match="channels-last"):
        pool_kernel.relu_max_pool(x)


def test_backward_refuses_a_gradient_of_the_wrong_shape():
    x = torch.randn(2, 16, 4, 4).to(torch.bfloat16).contiguous(memory_format=LAST)
    out, position = pool_kernel.relu_max_pool(x)
    with pytest.raises(ValueError, match="shape"):
        pool_kernel.relu_max_pool_backward(out[:1], position, 4, 4)
    with pytest.raises(ValueError, match="uint8"):
        pool_kernel.relu_max_pool_backward(out, position.to(torch.int64), 4, 4)
    with pytest.raises(ValueError, match="uint8"):
        pool_kernel.relu_max_pool_backward(out, position[0], 4, 4)
    with pytest.raises(ValueError, match="fp32 CPU gradient"):
        pool_kernel.relu_max_pool_backward(out.double(), position, 4, 4)


def test_a_gradient_in_nchw_memory_is_taken():
    torch.manual_seed(3)
    x = torch.randn(2, 16, 6, 6).to(torch.bfloat16).contiguous(memory_format=LAST)
    grad_out = torch.randn(2, 16, 3, 3).to(torch.bfloat16)  # contiguous NCHW, as after a flatten
    assert torch.equal(bits(kernel_pair(x, grad_out)[1]), bits(pytorch_pair(x, grad_out)[1]))


def test_a_negated_gradient_view_is_read_as_its_values():
    torch.manual_seed(7)
    x = torch.randn(2, 16, 4, 4).to(torch.bfloat16).contiguous(memory_format=LAST)
    grad_out = torch.randn(2, 16, 2, 2).to(torch.bfloat16).contiguous(memory_format=LAST)
    _, position = pool_kernel.relu_max_pool(x)
    negated = pool_kernel.relu_max_pool_backward(grad_out._neg_view(), position, 4, 4)
    assert torch.equal(negated, pool_kernel.relu_max_pool_backward(-grad_out, position, 4, 4))
