import pytest
import torch

from vitlab.kernels import gelu
from vitlab.kernels.build import compiled_library, loaded_library
from vitlab.kernels.timing import KERNEL_FUNCTIONS, KernelClock

pytestmark = pytest.mark.skipif(compiled_library() is None, reason="vitlab's C kernels are not available here")


def test_every_call_is_counted_and_timed_per_kernel():
    x = torch.randn(2048, 64).to(torch.bfloat16)
    if not gelu.kernel_supports(x):
        pytest.skip("no AVX-512 C kernels on this machine")
    with KernelClock() as clock:
        out, derivative = gelu.gelu_forward(x)
        gelu.gelu_backward(out, derivative)
        gelu.gelu_forward(x)
    assert clock.calls == {"vitlab_gelu_forward": 2, "vitlab_gelu_backward": 1}
    assert clock.seconds == pytest.approx(sum(clock.by_kernel.values())) and clock.by_kernel["vitlab_gelu_forward"] > 0


def test_the_librarys_own_functions_are_put_back_also_after_an_error():
    library = loaded_library()
    before = {name: getattr(library, name) for name in KERNEL_FUNCTIONS}
    with pytest.raises(ZeroDivisionError), KernelClock():
        assert getattr(library, KERNEL_FUNCTIONS[0]) is not before[KERNEL_FUNCTIONS[0]]
        1 / 0  # noqa: B018
    assert all(getattr(library, name) is function for name, function in before.items())


def test_a_clock_inside_a_clock_is_refused_and_leaves_the_outer_one_timing():
    x = torch.randn(256, 64).to(torch.bfloat16)
    if not gelu.kernel_supports(x):
        pytest.skip("no AVX-512 C kernels on this machine")
    with KernelClock() as outer:
        with pytest.raises(RuntimeError, match="does not nest"), KernelClock():
            pass
        gelu.gelu_forward(x)
    assert outer.calls == {"vitlab_gelu_forward": 1}


def test_capability_queries_are_not_timed():
    assert "vitlab_gelu_supported" not in KERNEL_FUNCTIONS and "vitlab_attention_max_tokens" not in KERNEL_FUNCTIONS
    assert "vitlab_matmul_pairs" in KERNEL_FUNCTIONS and "vitlab_weight_gradient" in KERNEL_FUNCTIONS
