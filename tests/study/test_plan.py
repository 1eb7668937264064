"""Study plans: SPECs with any setting, sweeps, budgets, duplicates."""

import pytest

from vitlab.errors import VitlabError
from vitlab.study.plan import StudyPlan, parse_spec, plan_study, sweep_specs


def test_parse_spec_reads_model_preset_and_typed_settings_of_any_kind():
    spec = parse_spec("vit:patch_size=6,pool=mean,dropout=0.1,lr=1e-3,train_size=5000")
    assert (spec.model, spec.preset) == ("vit", None)
    assert spec.overrides == {"patch_size": 6, "pool": "mean", "dropout": 0.1, "lr": 0.001, "train_size": 5000}
    assert spec.text == "vit:patch_size=6,pool=mean,dropout=0.1,lr=0.001,train_size=5000"
    assert spec.slug == "vit_patch_size-6_pool-mean_dropout-0.1_lr-0.001_train_size-5000"
    assert parse_spec("vit-fast").preset == "vit-fast" and parse_spec("vit-fast").model == "vit"
    assert parse_spec("cnn-small").overrides == {}


def test_tuple_settings_are_written_with_a_slash_or_brackets():
    assert parse_spec("cnn-small:channels=8/16").overrides == {"channels": (8, 16)}
    assert parse_spec("cnn-small:channels=[8,16],lr=0.01").overrides == {"channels": (8, 16), "lr": 0.01}
    assert parse_spec("cnn-small:channels=8/16").slug == "cnn-small_channels-8x16"
    assert sweep_specs(["cnn-small"], "channels=8/16,16/32") == ["cnn-small:channels=8/16", "cnn-small:channels=16/32"]
    assert parse_spec("cnn-small:dataset=folder:/data/pets").overrides == {"dataset": "folder:/data/pets"}  # a path keeps its '/'


def test_timm_specs_name_the_architecture_first_and_bracket_their_keyword_arguments(tmp_path):
    spec = parse_spec("timm:resnet18,lr=0.01")
    assert (spec.model, spec.overrides) == ("timm", {"architecture": "resnet18", "lr": 0.01})
    assert (spec.text, spec.slug) == ("timm:resnet18,lr=0.01", "timm_resnet18_lr-0.01")
    assert parse_spec("timm:architecture=resnet18,lr=0.01").text == spec.text  # one SPEC, however it is spelled
    vit = parse_spec("timm:vit_tiny_patch16_224,timm_kwargs=[patch_size=8,depth=2]")
    assert vit.overrides["timm_kwargs"] == {"patch_size": 8, "depth": 2}
    assert vit.text == "timm:vit_tiny_patch16_224,timm_kwargs=[patch_size=8,depth=2]" and parse_spec(vit.text) == vit
    plan = StudyPlan(specs=["cnn-small", "timm:resnet18"], budget={"epochs": 1}, seeds=[0])
    assert sorted(type(member.config.model).__name__ for member in plan.members(tmp_path)) == ["SmallCNNConfig", "TimmConfig"]


@pytest.mark.parametrize(("text", "message"), [
    ("resnet", "unknown model or preset"),
    ("vit:depth=3", "unknown setting 'depth'"),
    ("vit:patch_size=big", "bad value 'big'"),
    ("vit:num_heads=3", "not divisible by num_heads"),
    ("vit:patch_size", "expected NAME=VALUE"),
    ("cnn-small:patch_size=4", "does not apply to model 'cnn-small'"),
    ("vit:num_classes=20", "set by the dataset"),
    ("vit:seed=3", "set for the whole study"),
    ("vit:lr=-1", "lr must be positive"),
    ("vit:lr=inf", "must be finite"),
])
def test_bad_specs_are_refused_with_the_reason(text, message):
    with pytest.raises(VitlabError, match=message):
        parse_spec(text)


def test_sweep_makes_one_spec_per_value_of_any_setting():
    assert sweep_specs(["vit"], "num_blocks=2,4,8") == ["vit:num_blocks=2", "vit:num_blocks=4", "vit:num_blocks=8"]
    assert sweep_specs(["cnn-small", "vit:patch_size=8"], "lr=0.001,0.003") == [
        "cnn-small:lr=0.001", "cnn-small:lr=0.003", "vit:patch_size=8,lr=0.001", "vit:patch_size=8,lr=0.003"]
    with pytest.raises(VitlabError, match="at least two values"):
        sweep_specs(["vit"], "num_blocks=2")


def test_budget_settings_apply_to_every_spec_and_a_foreign_one_is_an_error():
    plan = StudyPlan(specs=["cnn-small", "vit:patch_size=8"], budget={"epochs": 3, "lr": 0.01}, seeds=[0])
    cnn = plan.run_config(parse_spec("cnn-small"), seed=5)
    vit = plan.run_config(parse_spec("vit:patch_size=8"), seed=5)
    assert cnn.train.epochs == 3 and cnn.train.seed == 5 and cnn.train.lr == 0.01
    assert vit.model.patch_size == 8 and vit.train.epochs == 3
    with pytest.raises(VitlabError, match="SPEC 'cnn-small': --patch_size does not apply to model 'cnn-small'"):
        StudyPlan(specs=["cnn-small", "vit"], budget={"patch_size": 4}, seeds=[0])


def test_specs_that_map_to_the_same_run_are_refused():
    with pytest.raises(VitlabError, match="are the same run"):
        StudyPlan(specs=["vit:patch_size=4", "vit:patch_size=04"], budget={}, seeds=[0])
    with pytest.raises(VitlabError, match="are the same run"):
        StudyPlan(specs=["vit:patch_size=4", "vit:patch_size=٤"], budget={}, seeds=[0])  # an Arabic-Indic digit four
    with pytest.raises(VitlabError, match="are the same run"):
        StudyPlan(specs=["vit:lr=0.001", "vit:lr=1e-3"], budget={}, seeds=[0])


def test_values_that_differ_past_six_digits_are_different_runs():
    spec = parse_spec("mlp:lr=0.0012345678")
    assert spec.overrides["lr"] == 0.0012345678 and parse_spec(spec.text) == spec
    plan = StudyPlan(specs=["mlp:lr=0.0012345678", "mlp:lr=0.0012345679"], budget={}, seeds=[0])
    assert len(set(plan.specs)) == 2


def test_a_study_whose_specs_would_test_on_different_images_or_need_too_long_a_folder_is_refused():
    with pytest.raises(VitlabError, match="tested on different images"):
        StudyPlan(specs=["mlp", "mlp:test_subset=40"], budget={"test_subset": 50}, seeds=[0])
    settings = ",".join(f"{name}={value}" for name, value in [("lr", 0.001), ("weight_decay", 0.01), ("warmup_epochs", 2.0),
                                                              ("label_smoothing", 0.1), ("min_lr_ratio", 0.01), ("grad_clip", 1.0)] * 1)
    long_spec = "mlp:hidden_size=8,dropout=0.1," + settings + ",beta1=0.85,beta2=0.98,momentum=0.8,mixup=0.2,cutmix=0.3,random_erasing=0.1,tta=true"
    long_spec += ",crop_padding=3,flip=false,ema_decay=0.5,checkpoint_every=7,eval_batch_size=333,batch_size=77,schedule=linear"
    with pytest.raises(VitlabError, match="too long for a folder name"):
        StudyPlan(specs=[long_spec], budget={}, seeds=[0])


def test_plan_study_takes_the_first_seed_and_refuses_a_varied_setting_in_the_budget():
    plan = plan_study(["cnn-small"], {"seed": 4, "epochs": 2}, "cpu", 3, vary="lr=0.001,0.003")
    assert plan.seeds == [4, 5, 6] and plan.budget == {"epochs": 2} and plan.vary == "lr"
    assert plan.specs == ["cnn-small:lr=0.001", "cnn-small:lr=0.003"]
    with pytest.raises(VitlabError, match="is what --vary changes"):
        plan_study(["cnn-small"], {"lr": 0.1}, None, 3, vary="lr=0.001,0.003")
