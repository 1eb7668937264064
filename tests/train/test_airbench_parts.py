"""airbench's parts as settings: alternating flip, a moving average of the weights, multi-crop TTA, and training
on the validation images."""

import json

import pytest
import torch

from conftest import tiny_dataset
from vitlab.cli import main
from vitlab.config import TrainConfig
from vitlab.data import DeviceBatches
from vitlab.models import build_model
from vitlab.train.evaluate import shifted, tta_logits
from vitlab.train.trainer import Runner


def test_alternating_flip_mirrors_each_image_every_other_epoch():
    images = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8)
    batches = DeviceBatches(images, torch.zeros(64, dtype=torch.long), 64, train=True, device=torch.device("cpu"), crop_padding=0,
                            alternating_flip=True)
    order = torch.arange(64)
    first, _ = batches.batch(0, order, epoch=1)
    second, _ = batches.batch(0, order, epoch=2)
    third, _ = batches.batch(0, order, epoch=3)
    torch.testing.assert_close(first, third)  # the same orientation every other epoch
    torch.testing.assert_close(first, second.flip(3))  # and the other one in between
    assert 0.2 < batches.first_flip.float().mean() < 0.8  # which way comes first is random per image


def test_shifted_moves_pixels_and_fills_zeros():
    image = torch.arange(16.0).reshape(1, 1, 4, 4)
    moved = shifted(image, 1, 1)
    assert moved[0, 0, 0].tolist() == [0, 0, 0, 0] and moved[0, 0, 1, 1] == image[0, 0, 0, 0]
    torch.testing.assert_close(shifted(shifted(image, 1, 1), -1, -1)[..., :3, :3], image[..., :3, :3])


def test_multi_crop_tta_weights_the_untranslated_views_by_half():
    calls = []

    def forward(images):
        calls.append(images)
        return torch.full((len(images), 2), float(len(calls)))

    logits = tta_logits(forward, torch.zeros(3, 3, 8, 8), shift=1)
    assert len(calls) == 6  # image, mirror, and two shifted views each with its mirror
    assert logits[0, 0] == pytest.approx((1 + 2) / 2 / 2 + (3 + 4 + 5 + 6) / 4 / 2)


def test_the_weight_average_is_what_is_tested_and_saved():
    data = tiny_dataset()
    torch.manual_seed(0)
    model = build_model("mlp", hidden_size=16)
    runner = Runner(model, TrainConfig(epochs=2, batch_size=32, device="cpu", progress=False, ema_decay=0.9))
    runner.fit(data)
    assert runner.ema is None  # folded into the model at the end
    torch.manual_seed(0)
    plain = build_model("mlp", hidden_size=16)
    Runner(plain, TrainConfig(epochs=2, batch_size=32, device="cpu", progress=False)).fit(data)
    assert not torch.equal(model.layers[0].weight, plain.layers[0].weight)  # the average differs from the last weights


def test_training_on_the_validation_images_reports_it(cifar_root, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--model", "cnn-small", "--subset", "300", "--test_subset", "100", "--epochs", "1", "--batch-size", "50",
                 "--train_on_validation", "true", "--alternating_flip", "true", "--ema_decay", "0.9", "--tta", "true", "--tta_shift", "1",
                 "--progress", "true", "--data-dir", str(cifar_root), "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["train_images"] == 300 and results["validation_images_in_training"] is True
    assert "on 300 images (the validation images included)" in capsys.readouterr().out
    assert results["time_to_accuracy"] is None  # its "validation" accuracy is accuracy on training images
    assert main(["evaluate", str(out), "--data-dir", str(cifar_root)]) == 0  # re-testing the saved (averaged) weights
    assert json.loads(capsys.readouterr().out)["test_acc"] == results["test_acc"]


def test_only_the_last_epochs_validation_uses_test_time_augmentation(monkeypatch):
    import vitlab.train.evaluate as evaluate_module

    calls = []
    original = evaluate_module.tta_logits

    def counting(forward, images, shift, pad_mode):
        calls.append(len(images))
        return original(forward, images, shift, pad_mode)

    monkeypatch.setattr(evaluate_module, "tta_logits", counting)
    data = tiny_dataset()
    config = TrainConfig(epochs=3, batch_size=32, tta=True, tta_shift=1, progress=False, device="cpu")
    history = Runner(build_model("cnn-small"), config).fit(data)
    assert len(history) == 3
    assert calls == [len(data.val_images)]  # one batch of views, in epoch 3 only


def test_reflect_padding_mirrors_the_border_like_torch_reflect():
    from vitlab.data import apply_crop_flip, reflect_pad

    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    expected = torch.nn.functional.pad(images.float(), (2, 2, 2, 2), mode="reflect").to(torch.uint8)
    assert torch.equal(reflect_pad(images, 2), expected)
    corner = torch.zeros((2, 4), dtype=torch.long)  # every image cropped at the top-left of its padded copy
    cropped = apply_crop_flip(images, 2, corner, torch.zeros(4, dtype=torch.bool), pad_mode="reflect")
    assert torch.equal(cropped, expected[..., :8, :8])
    zero_filled = apply_crop_flip(images, 2, corner, torch.zeros(4, dtype=torch.bool))
    assert (zero_filled[..., :2, :] == 0).all() and not (cropped[..., :2, :] == 0).all()


def test_reflect_tta_views_are_airbenchs_mirror_padded_shifts():
    images = torch.randn(2, 3, 8, 8)
    padded = torch.nn.functional.pad(images, (1, 1, 1, 1), mode="reflect")
    torch.testing.assert_close(shifted(images, 1, 1, "reflect"), padded[..., 0:8, 0:8])
    torch.testing.assert_close(shifted(images, -1, -1, "reflect"), padded[..., 2:10, 2:10])


def test_pad_mode_is_checked_before_a_run_starts(tmp_path, capsys):
    assert main(["train", "--model", "cnn-small", "--pad_mode", "wrap", "--out", str(tmp_path / "run")]) != 0
    assert "pad_mode must be one of zeros, reflect" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_the_whitening_bias_gets_a_group_of_its_own_that_stops_after_its_epochs():
    from vitlab.train.optim import make_optimizer, make_schedule, parameter_groups

    model = build_model("aircnn", widths=(8, 16, 16))
    config = TrainConfig(optimizer="muon", lr=0.5, norm_bias_lr_scale=4.0, weight_decay=0.01, whitening_bias_epochs=3,
                         schedule="linear", warmup_epochs=0, device="cpu", progress=False)
    groups = parameter_groups(model, config)
    assert groups[-1]["params"] == [model.whiten.bias] and groups[-1]["stop_epoch"] == 3
    assert groups[-1]["lr"] == 0.5 * 4.0 and groups[-1]["weight_decay"] == 0.01 / 4.0  # the biases' settings
    assert sum(any(p is model.whiten.bias for p in group["params"]) for group in groups) == 1
    optimizer = make_optimizer(model, config, torch.device("cpu"))
    schedule = make_schedule(optimizer, config, steps_per_epoch=10, epochs=8)
    factors = [schedule.lr_lambdas[-1](step) for step in (0, 15, 30, 79)], [schedule.lr_lambdas[0](step) for step in (0, 40, 80)]
    assert factors == ([1.0, 0.5, 0.0, 0.0], [1.0, 0.5, 0.0])


def test_the_whitening_bias_schedule_squeezes_the_warmup_and_ignores_a_stop_past_the_run():
    from vitlab.train.optim import make_optimizer, make_schedule

    def bias_factors(**settings):
        config = TrainConfig(optimizer="sgd", lr=0.1, device="cpu", progress=False, **settings)
        optimizer = make_optimizer(build_model("aircnn", widths=(8, 16, 16)), config, torch.device("cpu"))
        schedule = make_schedule(optimizer, config, steps_per_epoch=10, epochs=8)
        return [round(schedule.lr_lambdas[-1](step), 4) for step in (0, 19, 40, 79)], schedule.lr_lambdas[0](79)

    squeezed, _ = bias_factors(whitening_bias_epochs=4, warmup_epochs=4, schedule="linear")  # warmup: 2 of its 4 epochs
    assert squeezed == [0.05, 1.0, 0.0, 0.0]
    whole, others = bias_factors(whitening_bias_epochs=8, schedule="cosine", min_lr_ratio=0.1)
    assert whole[-1] == round(others, 4) > 0.09  # a stop at the run's end is the whole run, floor included


def test_the_whitening_bias_stops_moving_after_its_epochs():
    torch.manual_seed(0)
    model = build_model("aircnn", widths=(8, 16, 16))
    config = TrainConfig(epochs=3, batch_size=32, optimizer="muon", lr=0.2, norm_bias_lr_scale=8.0, whitening_bias_epochs=1,
                         schedule="linear", warmup_epochs=0, device="cpu", progress=False)
    seen, training = [], []
    runner = Runner(model, config)
    original = runner.train_step

    def recording(*args, **kwargs):
        seen.append(model.whiten.bias.detach().clone())
        training.append(model.whiten.bias.requires_grad)
        return original(*args, **kwargs)

    runner.train_step = recording
    runner.fit(tiny_dataset(count=96))  # 3 steps per epoch
    assert not torch.equal(seen[0], seen[3])  # it moved in epoch 1
    assert all(torch.equal(seen[3], later) for later in seen[4:]) and torch.equal(seen[3], model.whiten.bias)
    assert training == [True] * 3 + [False] * 6  # frozen from the epoch after its stop: backward skips the first conv's input
    assert model.whiten.bias.requires_grad  # and trainable again once fit() returns


def test_a_stop_within_an_epoch_freezes_from_the_next_epoch_and_a_run_that_stops_early_thaws():
    from vitlab.train.optim import make_optimizer, stopped_parameters

    model = build_model("aircnn", widths=(8, 16, 16))
    config = TrainConfig(epochs=3, batch_size=32, optimizer="muon", lr=0.2, whitening_bias_epochs=1.5, device="cpu", progress=False)
    optimizer = make_optimizer(model, config, torch.device("cpu"))
    assert [len(stopped_parameters(optimizer, done, epochs=3)) for done in (0, 1, 2)] == [0, 0, 1]
    assert stopped_parameters(optimizer, 2, epochs=3)[0] is model.whiten.bias
    runner = Runner(model, config)
    original = runner.train_step

    def failing_in_epoch_three(*args, **kwargs):
        if not model.whiten.bias.requires_grad:
            raise RuntimeError("stopped")
        return original(*args, **kwargs)

    runner.train_step = failing_in_epoch_three
    with pytest.raises(RuntimeError, match="stopped"):
        runner.fit(tiny_dataset(count=96))
    assert model.whiten.bias.requires_grad


def test_whitening_bias_epochs_is_refused_for_a_model_without_a_whitening_layer(cifar_root, tmp_path, capsys):
    from vitlab.errors import VitlabError
    from vitlab.study.plan import StudyPlan

    assert main(["train", "--model", "vit", "--whitening_bias_epochs", "3", "--data-dir", str(cifar_root), "--out", str(tmp_path / "run")]) != 0
    assert "applies to a model with a whitening layer" in capsys.readouterr().err and not (tmp_path / "run").exists()
    with pytest.raises(VitlabError, match="SPEC 'cnn-small'.*whitening layer"):
        StudyPlan(["aircnn", "cnn-small"], {"whitening_bias_epochs": 3}, [0])
