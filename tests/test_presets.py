import pytest

from vitlab.errors import VitlabError
from vitlab.models import build_model
from vitlab.presets import PRESETS, build_run_config


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_its_model_and_recipe(name):
    config = build_run_config(None, name, {})
    model = build_model(config.model, **config.model_config)
    assert config.preset == name and model.num_parameters > 0
    assert PRESETS[name].description


def test_flags_win_over_the_preset_and_foreign_settings_are_refused():
    config = build_run_config(None, "vit-best", {"epochs": 3, "mixup": 0.0})
    assert config.train.epochs == 3 and config.train.mixup == 0.0 and config.train.cutmix == 1.0
    with pytest.raises(VitlabError, match="does not apply to model 'vit'"):
        build_run_config(None, "vit-fast", {"widths": (8, 16)})


def test_vit_best_is_a_pure_vit_and_vit_fast_has_a_conv_tokenizer():
    assert PRESETS["vit-best"].model_config.get("stem", "patch") == "patch"
    assert PRESETS["vit-fast"].model_config["stem"] == "conv-pool"
