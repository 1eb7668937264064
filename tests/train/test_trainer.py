import json
import math
import shutil

import pytest
import torch

from conftest import tiny_dataset
from vitlab.config import TrainConfig
from vitlab.data import normalize
from vitlab.errors import VitlabError
from vitlab.models import build_model
from vitlab.train.optim import warmup_cosine
from vitlab.train.trainer import Runner, parameter_groups


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
    # Accuracy in percent and loss as plain cross-entropy, recomputed here from the probabilities it returns.
    expected_accuracy = 100.0 * (result.probabilities.argmax(1) == data.test_labels).double().mean().item()
    expected_loss = -result.probabilities[torch.arange(len(data.test_labels)), data.test_labels].log().mean().item()
    assert result.accuracy == pytest.approx(expected_accuracy) and result.loss == pytest.approx(expected_loss, rel=1e-4)
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
    decay, no_decay = parameter_groups(model, TrainConfig(weight_decay=0.05))
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in no_decay["params"]} >= {"cls_token", "position_embedding", "norm.weight", "head.bias"}
    assert all(p.ndim >= 2 for p in decay["params"])


def test_warmup_then_cosine_to_the_floor():
    assert warmup_cosine(0, 10, 100) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 100) == pytest.approx(1.0)
    assert warmup_cosine(55, 10, 100) == pytest.approx(0.5)
    assert warmup_cosine(100, 10, 100, min_ratio=0.1) == pytest.approx(0.1)


@pytest.mark.parametrize("bad", [dict(epochs=0), dict(lr=-1.0), dict(precision="fp8"), dict(device="tpu"), dict(label_smoothing=1.0),
                                 dict(micro_batch_size=-1)])
def test_train_config_rejects_impossible_values(bad):
    with pytest.raises(VitlabError):
        TrainConfig(**bad)


def test_sgd_groups_scale_norm_bias_lr_and_keep_decay_per_step():
    from vitlab.models import AirCNN

    config = TrainConfig(optimizer="sgd", lr=0.5, weight_decay=0.01, norm_bias_lr_scale=64.0)
    groups = parameter_groups(AirCNN(), config)
    norm_group = next(group for group in groups if group.get("lr") == 32.0)
    assert norm_group["weight_decay"] * norm_group["lr"] == pytest.approx(0.01 * 0.5)
    assert all(p.ndim == 1 for p in norm_group["params"])


def test_adamw_is_fused_on_the_cpu_and_steps_as_the_foreach_version():
    """One kernel for all parameters (a quarter of the foreach version's time for the ViTs' steps); the same update."""
    from vitlab.train.optim import fused_adamw_supported

    torch.manual_seed(0)
    model = build_model("vit", hidden_size=16, num_heads=2, num_blocks=1)
    twin = build_model("vit", hidden_size=16, num_heads=2, num_blocks=1)
    twin.load_state_dict(model.state_dict())
    config = quick_config(lr=1e-2, weight_decay=0.05)
    fused = Runner(model, config).make_optimizer()
    foreach = torch.optim.AdamW(parameter_groups(twin, config), lr=config.lr, betas=(config.beta1, config.beta2), foreach=True)
    assert fused.defaults["fused"] is (True if fused_adamw_supported(torch.device("cpu")) else None)  # torch >= 2.4
    for _ in range(5):
        for network, optimizer in ((model, fused), (twin, foreach)):
            for parameter in network.parameters():
                parameter.grad = torch.sin(parameter.detach() * 7 + 1)  # the same gradients for both copies
            optimizer.step()
    for mine, theirs in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)


def test_linear_schedule_is_a_triangle():
    from vitlab.train.optim import warmup_linear

    assert warmup_linear(4, 5, 25) == pytest.approx(1.0)
    assert warmup_linear(15, 5, 25, min_ratio=0.1) == pytest.approx(0.55)
    assert warmup_linear(25, 5, 25, min_ratio=0.1) == pytest.approx(0.1)


def test_aircnn_with_sgd_recipe_learns_and_tta_evaluates():
    data = tiny_dataset()
    config = quick_config(optimizer="sgd", lr=0.2, momentum=0.85, schedule="linear", norm_bias_lr_scale=16, tta=True)
    runner = Runner(build_model("aircnn", widths=(16, 32, 32)), config)
    history = runner.fit(data)
    assert history[-1]["val_acc"] > 50


def test_tta_averages_the_mirror_logits():
    data = tiny_dataset()
    model = build_model("mlp", hidden_size=8)
    plain = Runner(model, quick_config()).evaluate(data.test_images, data.test_labels)
    mirrored = Runner(model, quick_config(tta=True)).evaluate(data.test_images.flip(3), data.test_labels)
    both = Runner(model, quick_config(tta=True)).evaluate(data.test_images, data.test_labels)
    assert both.loss == pytest.approx(mirrored.loss, rel=1e-5)  # TTA is symmetric under mirroring
    assert both.loss != pytest.approx(plain.loss, rel=1e-5)


def test_mixup_and_cutmix_train_and_a_resumed_run_mixes_the_same(tmp_path):
    """Mixing draws from the batch generator, which the checkpoint saves: resuming from the end of
    epoch 1 gives the same final weights as the uninterrupted run."""
    data = tiny_dataset()
    config = quick_config(epochs=2, mixup=0.8, cutmix=1.0, precision="fp32")
    torch.manual_seed(0)
    straight = build_model("cnn-small")
    runner = Runner(straight, config)
    checkpoint = tmp_path / "checkpoint.pt"
    runner.epoch_end_hooks.append(lambda record: record["epoch"] == 1 and shutil.copy(checkpoint, tmp_path / "epoch1.pt"))
    history = runner.fit(data, checkpoint_path=checkpoint)
    assert all(math.isfinite(record["train_loss"]) for record in history)
    torch.manual_seed(123)  # the checkpoint brings back every random state
    resumed = build_model("cnn-small")
    Runner(resumed, config).fit(data, checkpoint_path=tmp_path / "epoch1.pt", resume=True)
    for mine, theirs in zip(resumed.parameters(), straight.parameters(), strict=True):
        assert torch.equal(mine, theirs)


def test_an_images_budget_sets_the_epochs_from_the_training_set_size():
    from vitlab.config import epochs_for

    assert epochs_for(TrainConfig(epochs=100, images_budget=160_000), 1_000) == 100  # capped at --epochs
    assert epochs_for(TrainConfig(epochs=100, images_budget=160_000), 4_000) == 40
    assert epochs_for(TrainConfig(epochs=100, images_budget=160_000), 40_000) == 4
    assert epochs_for(TrainConfig(epochs=7), 40_000) == 7
    data = tiny_dataset(count=128)
    runner = Runner(build_model("mlp", hidden_size=16), quick_config(epochs=10, images_budget=300))
    assert len(runner.fit(data)) == 3  # ceil(300 / 128)


def test_time_to_accuracy_is_the_training_time_of_the_first_epoch_that_reached_each_target():
    from vitlab.train.run import time_to_accuracy

    history = [{"epoch": 1, "epoch_seconds": 10.0, "val_acc": 55.0}, {"epoch": 2, "epoch_seconds": 12.0, "val_acc": 71.0},
               {"epoch": 3, "epoch_seconds": 11.0, "val_acc": 69.0}, {"epoch": 4, "epoch_seconds": 9.0, "val_acc": 80.5}]
    assert time_to_accuracy(history) == {"50": 10.0, "60": 22.0, "70": 22.0, "80": 42.0, "90": None, "94": None}


def test_a_compiled_model_trains_and_evaluates_end_to_end():
    """--compile: torch.compile's wrapper is what training and evaluation call (its __len__ raises: never test it for truth)."""
    data = tiny_dataset()
    torch.manual_seed(0)
    model = build_model("vit", hidden_size=16, num_heads=2, num_blocks=1, patch_size=8, lsa=True)
    runner = Runner(model, quick_config(epochs=1, compile=True))
    assert runner.forward is not model
    history = runner.fit(data)
    assert math.isfinite(history[-1]["val_loss"])
    assert runner.evaluate(data.val_images, data.val_labels).accuracy == history[-1]["val_acc"]


def one_step(model_name: str, micro_batch_size: int, **model_settings) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """A fresh seeded model after one SGD step on 16 tiny images; returns it with the step's loss and logits."""
    data = tiny_dataset(count=16)
    torch.manual_seed(0)
    model = build_model(model_name, **model_settings)
    runner = Runner(model, quick_config(batch_size=16, micro_batch_size=micro_batch_size, optimizer="sgd", lr=0.1, precision="fp32"))
    images = normalize(data.train_images, mean=data.mean, std=data.std)
    loss, logits = runner.train_step(images, data.train_labels, runner.make_optimizer())
    return model, loss, logits


def test_micro_batches_step_as_the_whole_batch_does_without_batch_norm():
    whole, whole_loss, whole_logits = one_step("mlp", 0)
    parts, parts_loss, parts_logits = one_step("mlp", 5)  # 5 + 5 + 5 + 1 images
    assert parts_loss.item() == pytest.approx(whole_loss.item(), rel=1e-5)
    assert torch.allclose(parts_logits, whole_logits, atol=1e-5)
    for after_whole, after_parts in zip(whole.parameters(), parts.parameters(), strict=True):
        assert torch.allclose(after_parts, after_whole, atol=1e-6)
    assert not torch.equal(next(whole.parameters()), next(build_model("mlp").parameters()))  # the step moved it


def test_micro_batches_normalise_batch_norm_over_each_part():
    data = tiny_dataset(count=16)
    torch.manual_seed(0)
    model = build_model("aircnn", widths=(8, 16, 16)).train()
    images = normalize(data.train_images, mean=data.mean, std=data.std)
    with torch.no_grad():  # the logits are those of each half alone, with its own batch statistics
        expected = torch.cat([model(images[:8]), model(images[8:])])
    _, _, logits = one_step("aircnn", 8, widths=(8, 16, 16))
    assert torch.allclose(logits, expected, atol=1e-4)
    _, _, whole_logits = one_step("aircnn", 0, widths=(8, 16, 16))
    assert not torch.allclose(whole_logits, expected, atol=1e-3)


def test_a_warmup_longer_than_the_run_warms_up_over_the_whole_run():
    from vitlab.train.optim import make_schedule

    parameter = torch.nn.Parameter(torch.zeros(1))
    for warmup in (3.0, 1e308):  # 1e308 epochs overflowed the step count before it was clamped
        optimizer = torch.optim.SGD([parameter], lr=1.0)
        schedule = make_schedule(optimizer, TrainConfig(epochs=2, warmup_epochs=warmup), steps_per_epoch=5, epochs=2)
        rates = []
        for _ in range(10):
            rates.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            schedule.step()
        assert all(later > earlier for earlier, later in zip(rates, rates[1:], strict=False)) and rates[-1] <= 1.0, rates
