"""The benchmark harness runs (one step of each side); speed itself is measured, not tested."""

import sys
from pathlib import Path

import pytest
import torch

from conftest import real_cifar10_root, tiny_dataset
from vitlab.config import TrainConfig
from vitlab.models import build_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench  # noqa: E402


def test_flop_count_of_a_linear_model_by_hand():
    model = build_model("mlp", hidden_size=8, num_hidden_layers=0)  # one 3072→10 linear layer
    # forward 2·3072·10; backward the same again for the weight gradient (images need no gradient)
    assert bench.train_flops_per_image(model) == pytest.approx(2 * 2 * 3072 * 10, rel=0.01)


def test_vitlab_side_times_a_few_steps():
    config = TrainConfig(batch_size=32, device="cpu", progress=False)
    speed, precision = bench.time_vitlab(build_model("cnn-small"), tiny_dataset(), config, steps=2, warmup=1)
    assert speed > 0 and precision in ("fp32", "bf16")


@pytest.mark.skipif(real_cifar10_root() is None, reason="the reference side reads the real CIFAR-10 files through torchvision")
def test_reference_side_times_a_few_steps():
    loader = bench.reference_loader(str(real_cifar10_root()), batch_size=16)
    torch.manual_seed(0)
    vit = bench.build_reference("vit", {"hidden_size": 16, "num_heads": 2, "num_blocks": 1, "dropout": 0.1})
    assert bench.time_reference(vit, loader, steps=2, warmup=1) > 0


@pytest.mark.parametrize("name", sorted(bench.CONFIGS))
def test_reference_models_are_the_same_size_as_vitlabs(name):
    """Written separately, the seeds' way; within 1% of vitlab's parameters (the seeds' CNN has conv
    biases before BatchNorm, their ViT a position for the CLS token) and the same output."""
    model_name, model_config = bench.CONFIGS[name]
    model_config = bench.with_dropout(model_name, model_config, None)
    reference = bench.build_reference(model_name, model_config)
    ours = build_model(model_name, **model_config)
    reference_params = sum(p.numel() for p in reference.parameters())
    assert abs(reference_params - ours.num_parameters) <= 0.01 * ours.num_parameters
    outputs = reference.eval()(torch.randn(2, 3, 32, 32))
    logits = outputs[0] if isinstance(outputs, tuple) else outputs
    assert logits.shape == (2, 10)
