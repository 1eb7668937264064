"""The Gradio app without a browser: what it refuses, and a run without maps. (The page itself: test_browser.py.)"""

import socket
import sys

import pytest
import torch

from vitlab.data import CLASSES
from vitlab.errors import VitlabError
from vitlab.inspect.images import ImageSet
from vitlab.models import build_model
from vitlab.rundir import RunDir
from vitlab.serve.app import build_app, require_gradio, run_view, serve, whole_number
from vitlab.serve.runs import ServedRun, load_runs


def test_missing_gradio_is_one_line_with_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "gradio", None)
    with pytest.raises(VitlabError, match=r"^vitlab serve needs gradio, which is not installed; install it with: pip install 'vitlab\[serve\]'$"):
        require_gradio()


def test_an_empty_test_set_is_refused(served_runs):
    pytest.importorskip("gradio")
    empty = ImageSet(torch.zeros(0, 3, 32, 32, dtype=torch.uint8), torch.zeros(0, dtype=torch.long), [])
    with pytest.raises(VitlabError, match="no test images to show"):
        build_app(load_runs([served_runs["cnn"]]), empty)


def test_a_taken_port_is_one_line_naming_the_flags(served_runs):
    pytest.importorskip("gradio")
    images = ImageSet(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), torch.tensor([3, 5]), ["a", "b"])
    app = build_app(load_runs([served_runs["vit"]]), images)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(VitlabError, match=f"^cannot listen on 127.0.0.1:{port} .*; choose another --port or --host$"):
            serve(app, "127.0.0.1", port, announce=lambda line: pytest.fail(f"announced although the port is taken: {line}"))


def test_a_model_without_maps_gets_predictions_and_the_reason(tmp_path):
    pytest.importorskip("gradio")
    run = ServedRun("mlp", RunDir(tmp_path), build_model("mlp").eval(), list(CLASSES), 12.5)
    image = torch.full((3, 32, 32), 90, dtype=torch.uint8)
    top, overlay, caption = run_view(run)(image)
    assert len(top) == 5 and overlay is None
    assert caption == "a 'mlp' model has neither attention nor convolutional stages: predictions only"
    app = build_app([run], ImageSet(image[None], torch.tensor([2]), ["x"]))  # a folder without figures still builds
    texts = [getattr(block, "value", None) for block in app.blocks.values()]
    assert f"no confusion matrix: {tmp_path} has no test_predictions.safetensors; it was trained by an older vitlab or did not finish; train it again" in texts


def test_a_one_block_vit_and_a_one_image_test_set_still_build(tmp_path):
    pytest.importorskip("gradio")
    model = build_model("vit", patch_size=8, hidden_size=16, num_heads=1, num_blocks=1).eval()
    run = ServedRun("deep-1", RunDir(tmp_path), model, list(CLASSES), 10.0)
    image = torch.full((3, 32, 32), 30, dtype=torch.uint8)
    build_app([run], ImageSet(image[None], torch.tensor([0]), ["x"]))
    top, rollout, _, attention, caption = run_view(run)(image, 1, 1)
    assert len(top) == 5 and rollout.shape == attention.shape == (192, 192, 3)
    assert caption == "layer 1 of 1, head 1 of 1: CLS-to-patch attention"


@pytest.mark.parametrize("sent", [float("nan"), float("inf"), -3, 10**9, "abc", [0, 1], None])
def test_numbers_the_browser_sends_become_a_valid_layer_and_head(tmp_path, sent):
    model = build_model("vit", patch_size=8, hidden_size=16, num_heads=2, num_blocks=2).eval()
    run = ServedRun("vit", RunDir(tmp_path), model, list(CLASSES), 10.0)
    image = torch.full((3, 32, 32), 30, dtype=torch.uint8)
    *_, attention, caption = run_view(run)(image, sent, sent)
    assert attention.shape == (192, 192, 3) and caption.startswith("layer ")
    assert whole_number(sent, 0, 9) in range(10)


def test_one_listener_serves_both_attention_sliders_so_their_answers_keep_their_order(served_runs):
    # With a listener per slider, a layer change could finish after a later head change and leave the older pair shown.
    pytest.importorskip("gradio")
    images = ImageSet(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), torch.tensor([3, 5]), ["a", "b"])
    app = build_app(load_runs([served_runs["vit"]]), images)
    config = app.get_config_file()
    ids = {component["props"].get("elem_id"): component["id"] for component in config["components"]}
    number = next(name.split("-")[1] for name in ids if name and name.startswith("layer-"))  # the ViT's column
    sliders = {ids[f"layer-{number}"], ids[f"head-{number}"]}
    listeners = [dependency for dependency in config["dependencies"]
                 if any(target[0] in sliders and target[1] == "change" for target in dependency["targets"])]
    assert len(listeners) == 1
    assert {target[0] for target in listeners[0]["targets"]} == sliders and ids[f"attention-{number}"] in listeners[0]["outputs"]
