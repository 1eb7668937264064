"""timm models as vitlab models: trained and reloaded through the command line, attention read from the
hook equal to a recomputation, configs and their errors, stages, weight decay and ONNX export."""

import json
import re
import sys

import pytest
import torch

from vitlab.cli import build_parser, main
from vitlab.cli.parser import given_settings
from vitlab.data import load_cifar10_test, normalize
from vitlab.errors import VitlabError
from vitlab.inspect.features import feature_maps
from vitlab.models import TimmConfig, VitlabModel, build_model
from vitlab.presets import build_run_config
from vitlab.rundir import RunDir
from vitlab.train.optim import parameter_groups

pytest.importorskip("timm", reason="timm models need pip install 'vitlab[timm]'")

QUICK = ["--subset", "400", "--test_subset", "100", "--epochs", "1", "--batch-size", "50", "--progress", "false", "--precision", "fp32"]
TINY_VIT = {"patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2}


def tiny_vit(**kwargs):
    return build_model("timm", architecture="vit_tiny_patch16_224", timm_kwargs={**TINY_VIT, **kwargs})


def test_cli_trains_timm_resnet18_and_the_run_reloads_with_equal_logits(cifar_root, tmp_path, capsys):
    run = tmp_path / "resnet18"
    assert main(["train", "--model", "timm:resnet18", *QUICK, "--data-dir", str(cifar_root), "--out", str(run)]) == 0
    description = json.loads((run / "model.json").read_text())
    assert {key: description[key] for key in ("model", "config")} == {
        "model": "timm", "config": {"architecture": "resnet18", "timm_kwargs": {}, "image_size": 32, "num_classes": 10}}
    assert description["data"]["dataset"] == "cifar10" and len(description["data"]["classes"]) == 10
    results = RunDir(run).results()
    assert results["model"] == "timm" and results["params"] == 11_181_642  # resnet18 with a 10-class head
    model = RunDir(run).model().eval()
    images, _ = load_cifar10_test(cifar_root, 100)
    with torch.inference_mode():
        probabilities = model(normalize(images)).softmax(dim=1)
    saved = RunDir(run).predictions()["probabilities"]  # what the trained model gave at the end of training
    torch.testing.assert_close(probabilities, saved, rtol=1e-4, atol=1e-5)


def test_cli_trains_a_timm_vit_and_attention_and_explain_run_on_it(cifar_root, tmp_path, capsys):
    run = tmp_path / "vit"
    assert main(["train", "--model", "timm:vit_tiny_patch16_224", "--timm_kwargs", "img_size=32,patch_size=4,depth=2", *QUICK,
                 "--data-dir", str(cifar_root), "--out", str(run)]) == 0
    config = RunDir(run).config().model
    assert config == TimmConfig(architecture="vit_tiny_patch16_224", timm_kwargs={"img_size": 32, "patch_size": 4, "depth": 2})
    figures = tmp_path / "figures"
    assert main(["attention", str(run), "--images", "1", "--data-dir", str(cifar_root), "--out", str(figures)]) == 0
    assert (figures / "attention_000.png").is_file() and (figures / "attention_distance.png").is_file()
    assert main(["explain", str(run), "--methods", "gradcam,rollout,gradrollout", "--head-fusion", "max", "--discard-ratio", "0.5",
                 "--images", "2", "--score-images", "4", "--steps", "8", "--data-dir", str(cifar_root), "--out", str(figures)]) == 0
    scores = json.loads((figures / "explain_scores.json").read_text())
    assert sorted(row["method"] for row in scores["ranking"]) == ["gradcam", "gradrollout", "rollout"]
    assert all(row["images"] == 4 and 0 <= row["deletion_auc"] <= 1 and 0 <= row["insertion_auc"] <= 1 for row in scores["ranking"])
    assert scores["head_fusion"] == "max" and scores["discard_ratio"] == 0.5
    assert "| 1 | vit | timm:vit_tiny_patch16_224 |" in (figures / "explain_scores.md").read_text()


def test_attention_from_the_hook_matches_a_manual_recomputation():
    torch.manual_seed(0)
    model = tiny_vit().eval()
    attention_modules = [block.attn for block in model.network.blocks]
    assert all(module.fused_attn for module in attention_modules)  # training and plain inference use the fused kernel
    inputs = {}
    handles = [module.register_forward_pre_hook(lambda m, args: inputs.__setitem__(m, args[0])) for module in attention_modules]
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        fast_logits = model(images)  # the fused path; records each attention module's input tokens
        logits, maps = model(images, return_attention=True)
    for handle in handles:
        handle.remove()
    assert len(maps) == 2 and maps[0].shape == (3, 2, 17, 17)  # (B, heads, CLS + 4×4 patches, same)
    for module, recorded in zip(attention_modules, maps, strict=True):
        tokens = inputs[module]  # (B, T, D)
        qkv = module.qkv(tokens).reshape(3, 17, 3, module.num_heads, module.head_dim).permute(2, 0, 3, 1, 4)
        query, key = module.q_norm(qkv[0]), module.k_norm(qkv[1])  # (B, heads, T, Dh)
        expected = (query @ key.transpose(-2, -1) / module.head_dim**0.5).softmax(dim=-1)
        torch.testing.assert_close(recorded, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits, fast_logits, rtol=1e-4, atol=1e-5)
    assert all(module.fused_attn for module in attention_modules)  # restored after the call
    assert not any(module.attn_drop._forward_pre_hooks for module in attention_modules)  # the recording hooks are gone
    assert model.returns_attention and not model.has_stages
    layout = model.token_layout()
    assert (layout.prefix_tokens, layout.grid_size, layout.patch_size, layout.readout, layout.num_layers, layout.num_heads) == (1, 4, 8, "cls", 2, 2)


def test_save_and_load_rebuild_the_model_from_model_json(tmp_path):
    torch.manual_seed(0)
    model = tiny_vit(global_pool="avg").eval()
    model.save(tmp_path)
    loaded = VitlabModel.load(tmp_path).eval()
    assert loaded.config == model.config and loaded.token_layout().readout == "mean"
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(images), model(images), rtol=0, atol=0)


def test_timm_cnn_stages_are_feature_maps_and_vit_tokens_skip_weight_decay():
    resnet = build_model("timm", architecture="resnet18")
    assert resnet.has_stages and not resnet.returns_attention
    _, stages = feature_maps(resnet, torch.randn(1, 3, 32, 32))
    assert [(name.split()[0], tuple(maps.shape[1:])) for name, maps in stages] == [
        ("act1", (64, 16, 16)), ("layer1", (64, 8, 8)), ("layer2", (128, 4, 4)), ("layer3", (256, 2, 2)), ("layer4", (512, 1, 1))]
    with pytest.raises(VitlabError, match="returns no attention"):
        from vitlab.inspect.attention import require_attention

        require_attention(resnet)
    vit = tiny_vit()
    from vitlab.config import TrainConfig

    no_decay = {id(p) for group in parameter_groups(vit, TrainConfig()) if group["weight_decay"] == 0 for p in group["params"]}
    assert id(vit.network.cls_token) in no_decay and id(vit.network.pos_embed) in no_decay
    assert id(vit.network.blocks[0].attn.qkv.weight) not in no_decay


def test_model_names_flags_and_config_errors_are_clear(monkeypatch):
    run = build_run_config("timm:resnet18", None, {"epochs": 1})
    assert run.model == TimmConfig(architecture="resnet18") and run.model_name == "timm"
    args = build_parser().parse_args(["train", "--model", "timm:vit_tiny_patch16_224", "--timm_kwargs", "img_size=32,patch_size=4,qkv_bias=false"])
    assert given_settings(args) == {"timm_kwargs": {"img_size": 32, "patch_size": 4, "qkv_bias": False}}
    for make, message in [
        (lambda: build_run_config("timm:resnet18", None, {"architecture": "resnet34"}), "disagree"),
        (lambda: TimmConfig(timm_kwargs={"pretrained": True}), "may not set pretrained"),
        (lambda: TimmConfig(timm_kwargs={"img_size": 224}), "differs from the data's image size 32"),
        (lambda: build_model("timm", architecture="resnet1"), "timm has no model 'resnet1'; did you mean"),
        (lambda: build_model("timm", architecture="resnet18", timm_kwargs={"patch_size": 4}), "timm could not build 'resnet18'"),
        (lambda: build_run_config("vit:resnet18", None, {}), "only timm:NAME takes a name"),
    ]:
        with pytest.raises(VitlabError, match=re.escape(message)):
            make()
    monkeypatch.setitem(sys.modules, "timm", None)  # as if timm were not installed
    with pytest.raises(VitlabError, match=re.escape("pip install 'vitlab[timm]'")):
        build_model("timm")


def test_a_bad_model_name_on_the_command_line_is_one_line(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["train", "--model", "resnet:18"])
    assert stop.value.code == 2
    error = capsys.readouterr().err
    assert "only timm:NAME takes a name after a colon" in error and len(error.strip().splitlines()) == 1


@pytest.mark.parametrize("make", [lambda: build_model("timm", architecture="test_resnet"), tiny_vit], ids=["test_resnet", "vit"])
def test_onnx_export_of_timm_models_agrees_with_pytorch(make, tmp_path):
    pytest.importorskip("onnxruntime")
    from vitlab.inspect.export import check_onnx, export_onnx

    torch.manual_seed(0)
    model = make().eval()  # test_resnet: timm's small ResNet for tests
    path = export_onnx(model, tmp_path / "model.onnx")
    check = check_onnx(path, model, torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8))
    assert check.top1_agreement == 1.0 and check.max_abs_logit_difference < 1e-3
