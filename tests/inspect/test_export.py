"""ONNX export: the file runs in onnxruntime and agrees with PyTorch."""

import json

import onnx
import pytest
import torch

from vitlab.cli import main
from vitlab.data import load_cifar10
from vitlab.errors import VitlabError
from vitlab.inspect.export import check_onnx, export_onnx
from vitlab.models import VitlabModel, build_model
from vitlab.presets import PRESETS

QUICK = ["--subset", "300", "--test_subset", "100", "--epochs", "1", "--batch-size", "50", "--progress", "false"]


@pytest.mark.parametrize("model_args", [
    ["--model", "cnn-small"],
    ["--model", "vit", "--patch_size", "6", "--hidden_size", "32", "--num_heads", "4", "--num_blocks", "2", "--pool", "mean"],
    ["--model", "aircnn"],
    ["--model", "vit", "--stem", "conv-group", "--hidden_size", "64", "--num_heads", "4", "--num_blocks", "1", "--pool", "mean",
     "--optimizer", "muon-adamw"],
])
def test_exported_run_agrees_with_pytorch_on_a_test_batch(model_args, cifar_root, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *model_args, *QUICK, "--data-dir", str(cifar_root), "--out", str(run)]) == 0
    onnx_file = tmp_path / "model.onnx"
    assert main(["export", str(run), "--onnx", str(onnx_file), "--check-images", "0"]) == 0
    model = VitlabModel.load(run)
    images = load_cifar10(cifar_root, test_subset=100, download_if_missing=False).test_images  # a test batch
    check = check_onnx(onnx_file, model, images)
    assert check.images == 100
    assert check.top1_agreement >= 0.999
    assert check.max_abs_logit_difference < 1e-3
    metadata = {p.key: p.value for p in onnx.load(str(onnx_file)).metadata_props}
    assert json.loads(metadata["classes"])[0] == "airplane"


@pytest.mark.parametrize("settings", [PRESETS["vit-pure"].model_config,
                                      {**PRESETS["vit-pure"].model_config, "hidden_size": 32, "num_blocks": 1, "registers": 2, "pool": "cls"}])
def test_vit_pure_techniques_export_and_agree_with_pytorch(settings, tmp_path):
    """Shifted patches, locality self-attention (its -inf diagonal), sequence pooling and registers all convert."""
    torch.manual_seed(0)
    model = build_model("vit", **settings).eval()
    torch.nn.init.normal_(model.head.weight)  # the zero-initialised head would make every logit 0
    path = export_onnx(model, tmp_path / "model.onnx")
    check = check_onnx(path, model, torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8))
    assert check.top1_agreement >= 0.999
    assert check.max_abs_logit_difference < 1e-3


def test_export_takes_any_batch_size(tmp_path):
    model = build_model("vit", patch_size=8, hidden_size=16, num_heads=2, num_blocks=1)
    path = export_onnx(model, tmp_path / "m.onnx")
    for batch in (1, 7):
        check = check_onnx(path, model, torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8))
        assert check.images == batch and check.top1_agreement == 1.0


def test_export_errors_are_one_line(tmp_path, capsys):
    assert main(["export", str(tmp_path / "missing"), "--onnx", str(tmp_path / "m.onnx")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(VitlabError, match="should end in .onnx"):
        export_onnx(build_model("cnn-small"), tmp_path / "model.bin")
