import pytest
import torch

from vitlab.errors import VitlabError
from vitlab.models import CNN, MLP, CNNConfig, MLPConfig, SmallCNN, build_model


def test_small_cnn_is_the_seeds_network():
    model = SmallCNN()
    # conv 3→16 (448) + conv 16→32 (4,640) + linear 2048→10 (20,490)
    assert model.num_parameters == 448 + 4640 + 20490
    assert model.classifier.in_features == 2048
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_bn_cnn_has_the_seed_002_stages():
    model = CNN()
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 64, 128, 128, 256, 256, 512, 512]
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert CNN(CNNConfig(widths=(8, 16))).classifier.in_features == 16


def test_mlp_sizes_are_configurable():
    model = MLP(MLPConfig(hidden_size=64, num_hidden_layers=3))
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert [layer.out_features for layer in linears] == [64, 64, 64, 10]
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_bad_configs_and_unknown_settings_are_clear_errors():
    with pytest.raises(VitlabError, match="at most 5 stages"):
        CNNConfig(widths=(8,) * 6)
    with pytest.raises(VitlabError, match="has no setting patch_size"):
        build_model("cnn", patch_size=4)
    with pytest.raises(VitlabError, match="unknown model 'resnet'"):
        build_model("resnet")


@pytest.mark.parametrize("name", ["cnn-small", "cnn", "mlp"])
def test_save_load_round_trip(name, tmp_path):
    model = build_model(name).eval()
    model.save(tmp_path)
    loaded = type(model).load(tmp_path).eval()
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(images), loaded(images), rtol=0, atol=0)


def test_aircnn_shapes_and_frozen_whitening():
    from vitlab.models import AirCNN

    model = AirCNN()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert not model.whiten.weight.requires_grad
    assert all(not m.weight.requires_grad for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_aircnn_whitening_layer_whitens_patches():
    from vitlab.models import AirCNN

    torch.manual_seed(0)
    mixing = torch.tensor([[1.0, 0.9, 0.8], [0.0, 0.5, 0.4], [0.0, 0.0, 0.3]])
    images = torch.einsum("ij,bjhw->bihw", mixing, torch.randn(64, 3, 32, 32))  # correlated channels
    model = AirCNN()
    model.init_from_data(images)
    with torch.no_grad():
        responses = model.whiten(images)[:, :12]  # (B, 12, 31, 31): the + half of the ± pairs
    flat = responses.permute(1, 0, 2, 3).reshape(12, -1)
    covariance = flat @ flat.T / flat.shape[1]
    torch.testing.assert_close(covariance, torch.eye(12), atol=0.05, rtol=0)
