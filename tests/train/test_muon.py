import math

import pytest
import torch

from conftest import tiny_dataset
from vitlab.config import TrainConfig
from vitlab.errors import VitlabError
from vitlab.models import AirCNN, build_model
from vitlab.train.muon import MuonAdamW, MuonSGD, orthogonalize
from vitlab.train.optim import make_optimizer, parameter_groups
from vitlab.train.trainer import Runner


@pytest.mark.parametrize("shape", [(64, 216), (256, 64), (32, 32)])
def test_orthogonalize_flattens_the_singular_values(shape):
    generator = torch.Generator().manual_seed(0)
    # A badly conditioned matrix: singular values spread over three orders of magnitude.
    u, _ = torch.linalg.qr(torch.randn(shape[0], shape[0], generator=generator))
    v, _ = torch.linalg.qr(torch.randn(shape[1], shape[1], generator=generator))
    rank = min(shape)
    spread = torch.logspace(0, -3, rank)
    matrix = u[:, :rank] @ torch.diag(spread) @ v[:, :rank].T
    singular = torch.linalg.svdvals(orthogonalize(matrix, steps=5))
    assert singular.max() < 1.3  # the quintic iteration lands in roughly [0.7, 1.2], not exactly at 1
    assert (singular[: rank // 2] > 0.5).all()  # the large half of the spectrum is levelled
    original_ratio = spread[0] / spread[rank // 2 - 1]
    assert singular[0] / singular[rank // 2 - 1] < original_ratio / 10


def test_orthogonalize_keeps_the_singular_vectors():
    generator = torch.Generator().manual_seed(1)
    matrix = torch.randn(16, 40, generator=generator)
    u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
    result = orthogonalize(matrix, steps=8)
    # U Vᵀ is the target; the bf16 iteration gets its direction, not its exact magnitudes.
    cosine = (result * (u @ vh)).sum() / (result.norm() * (u @ vh).norm())
    assert cosine > 0.97


def muon_config(**overrides) -> TrainConfig:
    return TrainConfig(**(dict(optimizer="muon", lr=0.5, weight_decay=0.01, norm_bias_lr_scale=64.0, muon_lr=0.2, muon_momentum=0.6)
                          | overrides))


def test_muon_groups_filters_biases_and_the_rest():
    model = AirCNN()
    groups = parameter_groups(model, muon_config())
    rest, biases, filters = groups
    # Group 0 runs at --lr: the learning rate the epoch records show.
    assert make_optimizer(model, muon_config(), torch.device("cpu")).param_groups[0]["lr"] == 0.5
    assert filters["orthogonalize"] and filters["lr"] == 0.2 and filters["momentum"] == 0.6 and filters["weight_decay"] == 0
    assert all(p.ndim == 4 for p in filters["params"]) and len(filters["params"]) == 6  # two convs per group, whitening frozen
    assert [p.shape for p in rest["params"]] == [model.head.weight.shape]
    assert biases["lr"] == 32.0 and biases["weight_decay"] * biases["lr"] == pytest.approx(0.01 * 0.5)
    assert any(p is model.whiten.bias for p in biases["params"])  # the whitening bias too, as in airbench94_muon
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert sorted(id(p) for group in groups for p in group["params"]) == sorted(trainable)


def test_muon_rescales_each_filter_bank_to_norm_sqrt_out_before_moving_it():
    model = AirCNN()
    optimizer = make_optimizer(model, muon_config(muon_lr=1e-6), torch.device("cpu"))
    conv = model.groups[1].conv2.weight
    with torch.no_grad():
        conv.mul_(3.0)  # far from √out: only the rescaling brings it back
    before = conv.detach().clone()
    optimizer.zero_grad()
    model(torch.randn(8, 3, 32, 32)).square().sum().backward()
    optimizer.step()
    assert conv.norm().item() == pytest.approx(math.sqrt(conv.shape[0]), rel=1e-4)
    direction = (conv.detach() / conv.norm() - before / before.norm()).norm()
    assert 0 < direction < 1e-5  # a step of lr = 1e-6 along a unit-size update


def assert_same_steps(weights, ours, twins, theirs, steps: int) -> None:
    """Both optimisers take `steps` steps on the same loss of a (5, 3) matrix and a (3,) vector; the weights must agree."""
    for step in range(steps):
        for tensors, optimizer in ((weights, ours), (twins, theirs)):
            optimizer.zero_grad()
            ((tensors[0].sum(0) * tensors[1]).sin().sum() * (step + 1)).backward()
            optimizer.step()
    for mine, reference in zip(weights, twins, strict=True):
        torch.testing.assert_close(mine, reference)


def test_the_sgd_groups_step_exactly_like_pytorch_sgd_nesterov():
    torch.manual_seed(0)
    weights = [torch.randn(5, 3, requires_grad=True), torch.randn(3, requires_grad=True)]
    twins = [w.detach().clone().requires_grad_(True) for w in weights]
    ours = MuonSGD([{"params": weights[:1]}, {"params": weights[1:], "lr": 0.3}], lr=0.1, momentum=0.85, weight_decay=0.02)
    theirs = torch.optim.SGD([{"params": twins[:1]}, {"params": twins[1:], "lr": 0.3}], lr=0.1, momentum=0.85, nesterov=True,
                             weight_decay=0.02)
    assert_same_steps(weights, ours, twins, theirs, steps=4)


def test_muon_state_survives_a_state_dict_round_trip():
    model = AirCNN()
    optimizer = make_optimizer(model, muon_config(), torch.device("cpu"))
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    optimizer.step()
    restored = make_optimizer(model, muon_config(), torch.device("cpu"))
    restored.load_state_dict(optimizer.state_dict())
    conv = model.groups[0].conv1.weight
    torch.testing.assert_close(restored.state[conv]["momentum_buffer"], optimizer.state[conv]["momentum_buffer"])
    assert restored.param_groups[-1]["orthogonalize"]


@pytest.mark.parametrize("model", ["mlp", "vit", "cnn-small"])
def test_muon_on_a_model_without_batchnormed_filters_is_refused(model):
    # The ViT's patch projection and cnn-small's convolutions are 4-D but no BatchNorm follows them.
    with pytest.raises(VitlabError, match="declares none"):
        parameter_groups(build_model(model), muon_config())


def test_seed_002s_cnn_declares_every_convolution():
    model = build_model("cnn", widths=(8, 16))
    rest, biases, filters = parameter_groups(model, muon_config())
    assert len(filters["params"]) == 4 and all(p.ndim == 4 for p in filters["params"])
    assert all(p.ndim == 1 for p in biases["params"]) and [p.ndim for p in rest["params"]] == [2]


def test_a_weight_average_with_muon_is_refused():
    with pytest.raises(VitlabError, match="ema_decay"):
        muon_config(ema_decay=0.99)


def test_a_study_with_muon_on_a_model_without_filters_is_refused_before_its_folder_exists(tmp_path):
    from vitlab.study.plan import StudyPlan

    with pytest.raises(VitlabError, match="SPEC 'mlp'.*muon"):
        StudyPlan(["aircnn", "mlp"], {"optimizer": "muon"}, [0])


def test_aircnn_learns_with_muon():
    data = tiny_dataset()
    config = TrainConfig(optimizer="muon", lr=0.2, momentum=0.85, muon_lr=0.2, schedule="linear", warmup_epochs=0,
                         norm_bias_lr_scale=16, epochs=3, batch_size=32, progress=False, device="cpu")
    history = Runner(build_model("aircnn", widths=(16, 32, 32)), config).fit(data)
    assert history[-1]["val_acc"] > 50


def test_a_muon_run_of_a_model_without_filters_is_refused_before_its_folder_exists(tmp_path):
    from vitlab.presets import build_run_config
    from vitlab.train.run import train_run

    run = build_run_config("mlp", None, {"optimizer": "muon", "epochs": 1, "device": "cpu", "progress": False})
    with pytest.raises(VitlabError, match="muon"):
        train_run(run, tmp_path / "run", data=tiny_dataset())
    assert not (tmp_path / "run").exists()


def test_muon_adamw_moves_a_vits_hidden_matrices_with_muon_and_the_rest_with_adamw():
    model = build_model("vit", hidden_size=32, num_heads=2, num_blocks=2, stem="conv-group")
    config = TrainConfig(optimizer="muon-adamw", weight_decay=0.05)
    *adamw_groups, matrices = parameter_groups(model, config)
    assert matrices["orthogonalize"] and matrices["weight_decay"] == 0.05
    # 2 conv groups × 2 filters, then per block qkv, projection and two MLP layers
    assert [p.ndim for p in matrices["params"]] == [4] * 4 + [2] * 8
    in_muon = {id(p) for p in matrices["params"]}
    rest = [p for group in adamw_groups for p in group["params"]]
    assert not in_muon & {id(p) for p in rest}
    assert len(in_muon) + len(rest) == sum(p.requires_grad for p in model.parameters())
    assert {id(model.head.weight), id(model.position_embedding)} <= {id(p) for p in rest}


def test_the_adamw_groups_of_muon_adamw_step_exactly_like_pytorch_adamw():
    torch.manual_seed(0)
    weights = [torch.randn(5, 3, requires_grad=True), torch.randn(3, requires_grad=True)]
    twins = [w.detach().clone().requires_grad_(True) for w in weights]
    ours = MuonAdamW([{"params": weights[:1]}, {"params": weights[1:], "lr": 0.03, "weight_decay": 0.0}], lr=0.01, betas=(0.8, 0.95),
                     weight_decay=0.1)
    theirs = torch.optim.AdamW([{"params": twins[:1]}, {"params": twins[1:], "lr": 0.03, "weight_decay": 0.0}], lr=0.01,
                               betas=(0.8, 0.95), weight_decay=0.1)
    assert_same_steps(weights, ours, twins, theirs, steps=5)


def test_a_muon_adamw_matrix_step_has_about_adamws_rms_and_decays_the_weights():
    torch.manual_seed(0)
    matrix = torch.randn(64, 256, requires_grad=True)
    start = matrix.detach().clone()
    optimizer = MuonAdamW([{"params": [matrix], "orthogonalize": True}], lr=0.01, momentum=0.0, weight_decay=0.0)
    matrix.grad = torch.randn(64, 256) * 1e-3  # the size of the gradient does not matter to Muon
    optimizer.step()
    step_rms = (matrix.detach() - start).pow(2).mean().sqrt() / 0.01
    assert 0.15 < step_rms < 0.25  # Moonlight's 0.2 (an AdamW step's RMS is about that once its moments settle)
    decayed = torch.ones(4, 4, requires_grad=True)
    decayed.grad = torch.zeros(4, 4)
    MuonAdamW([decayed], lr=0.1, weight_decay=0.5).step()
    torch.testing.assert_close(decayed.detach(), torch.full((4, 4), 0.95))


@pytest.mark.parametrize("model", ["mlp", "aircnn"])
def test_muon_adamw_on_a_model_without_hidden_matrices_is_refused(model):
    with pytest.raises(VitlabError, match="muon-adamw.*declares"):
        parameter_groups(build_model(model), TrainConfig(optimizer="muon-adamw"))


def test_a_vit_learns_with_muon_adamw_and_resumes_its_state():
    data = tiny_dataset()
    config = TrainConfig(optimizer="muon-adamw", lr=2e-3, muon_momentum=0.95, epochs=3, batch_size=32, progress=False, device="cpu")
    model = build_model("vit", hidden_size=32, num_heads=2, num_blocks=2, stem="conv-group", pool="mean")
    history = Runner(model, config).fit(data)
    assert history[-1]["val_acc"] > 40
    optimizer = make_optimizer(model, config, torch.device("cpu"))
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    optimizer.step()
    restored = make_optimizer(model, config, torch.device("cpu"))
    restored.load_state_dict(optimizer.state_dict())
    qkv = model.blocks[0].attention.qkv.weight
    torch.testing.assert_close(restored.state[qkv]["momentum_buffer"], optimizer.state[qkv]["momentum_buffer"])
    assert restored.state[model.head.weight]["step"] == 1 and restored.param_groups[-1]["orthogonalize"]
