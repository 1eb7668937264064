"""Device and precision choices, and the GPU-path defects of issue #13 that a CPU can provoke."""

import pytest
import torch
from torch import nn

from vitlab.config import TrainConfig
from vitlab.errors import VitlabError
from vitlab.models import model_from_config
from vitlab.presets import build_run_config
from vitlab.train import device as device_module
from vitlab.train.checkpoint import Progress, TrainingState
from vitlab.train.optim import parameter_groups


@pytest.mark.parametrize("optimizer, sizes, bias_group", [("sgd", [7, 6, 1], 1), ("muon", [1, 6, 6, 1], 1)])  # last: the whitening bias
def test_sync_batchnorm_keeps_the_norm_bias_groups_of_cnn_fast(optimizer, sizes, bias_group):
    run = build_run_config(None, "cnn-fast", {"optimizer": optimizer})
    model = model_from_config(run.model)
    before = parameter_groups(model, run.train)
    after = parameter_groups(nn.SyncBatchNorm.convert_sync_batchnorm(model_from_config(run.model)), run.train)
    assert [len(group["params"]) for group in after] == [len(group["params"]) for group in before] == sizes
    biases = after[bias_group]
    assert biases["lr"] == run.train.lr * 64 and biases["weight_decay"] == pytest.approx(run.train.weight_decay / 64)


def test_emulated_bf16_gpus_are_not_chosen_and_are_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))  # a V100
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # what torch says there, emulation included
    cuda = torch.device("cuda")
    assert device_module.resolve_precision("auto", cuda) == "fp32"
    with pytest.raises(VitlabError, match="no native bf16"):
        device_module.resolve_precision("bf16", cuda)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))  # an H100
    assert device_module.resolve_precision("auto", cuda) == "bf16"


def test_a_checkpoint_from_another_device_says_which_device_to_resume_on():
    model = nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    generator = torch.Generator()
    state = TrainingState(model, optimizer, schedule, generator, generator, torch.device("cpu"))
    saved = state.state_dict(Progress(), [], 0.0, 0)
    saved["device_type"] = "cuda"
    with pytest.raises(VitlabError, match="written on cuda and this run is on cpu; resume it with --device cuda"):
        state.load_state_dict(saved)


def test_place_model_refuses_compile_with_sync_batchnorm_under_ddp(monkeypatch):
    from vitlab.train.distributed import DistContext

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(device_module, "pick_device", lambda name: torch.device("cuda"))
    monkeypatch.setattr(device_module, "resolve_precision", lambda precision, device: "bf16")
    monkeypatch.setattr(nn.Module, "to", lambda self, *a, **k: self)
    model = model_from_config(build_run_config(None, "cnn-fast", {}).model)
    with pytest.raises(VitlabError, match="--compile with several processes and BatchNorm"):
        device_module.place_model(model, TrainConfig(compile=True), DistContext(rank=0, world_size=2, local_rank=0))
