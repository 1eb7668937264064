"""The Gradio app without a browser: what it refuses. (What it shows: test_browser.py.)"""

import socket
import sys

import pytest
import torch

from vitlab.errors import VitlabError
from vitlab.inspect.images import ImageSet
from vitlab.serve.app import build_app, require_gradio, serve
from vitlab.serve.runs import load_runs


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
