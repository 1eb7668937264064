import json
import math

import pytest
import torch

from conftest import tiny_dataset
from vitlab.config import TrainConfig
from vitlab.errors import VitlabError
from vitlab.models import build_model
from vitlab.runner import Runner, parameter_groups
from vitlab.schedule import warmup_cosine


def quick_config(**overrides) -> TrainConfig:
    return TrainConfig(**(dict(epochs=3, batch_size=32, lr=3e-3, warmup_epochs=0.5, progress=False, device="cpu") | overrides))


def test_fit_learns_and_writes_history(tmp_path):
    data = tiny_dataset()
    model = build_model("cnn-small")
    runner = Runner(model, quick_config(), history_file=tmp_path / "metrics.jsonl")
    before = runner.evaluate(data.val_images, data.val_labels)
    history = runner.fit(data)
    assert [record["epoch"] for record in history] == [1, 2, 3]
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == history
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["val_acc"] > before.accuracy + 20  # colour-coded classes are easy
    assert runner.train_images_seen == 3 * (256 // 32) * 32


def test_same_seed_same_weights():
    data = tiny_dataset()
    weights = []
    for _ in range(2):
        torch.manual_seed(0)
        model = build_model("vit", hidden_size=16, num_heads=2, num_blocks=1, patch_size=8)
        Runner(model, quick_config(epochs=1)).fit(data)
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(weights[0], weights[1])


def test_evaluate_reports_percent_and_per_class():
    data = tiny_dataset()
    runner = Runner(build_model("mlp", hidden_size=16), quick_config())
    result = runner.evaluate(data.test_images, data.test_labels)
    assert len(result.predictions) == len(data.test_labels)
    assert 0 <= result.accuracy <= 100 and result.loss > 0
    per_class = result.per_class_accuracy(data.classes)
    assert set(per_class) == set(data.classes)


def test_bf16_autocast_trains_on_cpu():
    data = tiny_dataset()
    runner = Runner(build_model("cnn-small"), quick_config(epochs=1, precision="bf16"))
    assert runner.precision == "bf16"
    assert math.isfinite(runner.fit(data)[-1]["train_loss"])


def test_diverging_loss_stops_with_a_clear_error():
    data = tiny_dataset()
    runner = Runner(build_model("mlp", hidden_size=16), quick_config(lr=1e6, warmup_epochs=0))
    with pytest.raises(VitlabError, match="training loss became"):
        runner.fit(data)


def test_no_weight_decay_on_biases_norms_and_tokens():
    model = build_model("vit", hidden_size=16, num_heads=2, num_blocks=1)
    decay, no_decay = parameter_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in no_decay["params"]} >= {"cls_token", "position_embedding", "norm.weight", "head.bias"}
    assert all(p.ndim >= 2 for p in decay["params"])


def test_warmup_then_cosine_to_the_floor():
    assert warmup_cosine(0, 10, 100) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 100) == pytest.approx(1.0)
    assert warmup_cosine(55, 10, 100) == pytest.approx(0.5)
    assert warmup_cosine(100, 10, 100, min_ratio=0.1) == pytest.approx(0.1)


@pytest.mark.parametrize("bad", [dict(epochs=0), dict(lr=-1.0), dict(precision="fp8"), dict(device="tpu"), dict(label_smoothing=1.0)])
def test_train_config_rejects_impossible_values(bad):
    with pytest.raises(VitlabError):
        TrainConfig(**bad)
