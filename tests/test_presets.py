import pytest
from torch import nn

from vitlab.errors import VitlabError
from vitlab.models import model_from_config
from vitlab.presets import PRESETS, build_run_config


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_its_model_and_recipe(name):
    config = build_run_config(None, name, {})
    model = model_from_config(config.model)
    assert config.preset == name and config.model_name == PRESETS[name].model and model.num_parameters > 0
    for setting, value in PRESETS[name].train.items():
        assert getattr(config.train, setting) == value


def test_flags_win_over_the_preset_and_foreign_settings_are_refused():
    config = build_run_config(None, "vit-best", {"epochs": 3, "trivial_augment": False})
    assert config.train.epochs == 3 and config.data.trivial_augment is False and config.train.tta is True
    with pytest.raises(VitlabError, match="does not apply to model 'vit'"):
        build_run_config(None, "vit-fast", {"widths": (8, 16)})
    with pytest.raises(VitlabError, match="set by the dataset"):
        build_run_config(None, "vit-fast", {"num_classes": 20})


def convolutions_that_see_across_patches(model: nn.Module) -> list[nn.Conv2d]:
    """Convolutions other than a patch embedding (kernel = stride): the locality a pure ViT lacks."""
    return [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size != m.stride]


def test_vit_pure_has_no_convolution_and_the_hybrids_have_a_conv_tokenizer():
    assert convolutions_that_see_across_patches(model_from_config(build_run_config(None, "vit-pure", {}).model)) == []
    for hybrid in ("vit-fast", "vit-cct", "vit-best", "vit-cct-gpu"):
        assert len(convolutions_that_see_across_patches(model_from_config(build_run_config(None, hybrid, {}).model))) >= 2
