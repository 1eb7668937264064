"""`vitlab serve` on the command line: bad runs, ports and a missing gradio are one-line errors before any
server starts; good runs reach the server on 127.0.0.1 by default. (The page itself: tests/serve/.)"""

import sys

import pytest

from vitlab.cli import main


@pytest.fixture
def no_server(monkeypatch):
    """Record what would be served instead of serving it (and fail loudly if a refused command gets there)."""
    started = []
    monkeypatch.setattr("vitlab.serve.app.serve", lambda app, host, port, announce=print: started.append((app, host, port)))
    return started


def one_line_error(capsys, code, pattern):
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("vitlab serve: error: ") and pattern in err


def test_bad_run_folders_are_refused_before_the_server_starts(served_runs, serve_data, no_server, tmp_path, capsys):
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    for name in ("config.json", "checkpoint.pt"):
        (unfinished / name).write_text("{}")
    for folder, pattern in ((tmp_path / "typo", "does not exist"), (unfinished, "has not finished training"),
                            (tmp_path, "is not a finished run folder")):
        code = main(["serve", str(served_runs["cnn"]), str(folder), "--data-dir", str(serve_data)])
        one_line_error(capsys, code, pattern)
    assert no_server == []


@pytest.mark.parametrize("port, pattern", [("0", "must be between 1 and 65535, got 0"), ("http", "expected a port number, got 'http'")])
def test_a_bad_port_is_a_usage_error(port, pattern, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "runs/x", "--port", port])
    assert exit_.value.code == 2 and pattern in capsys.readouterr().err


@pytest.mark.parametrize("host", ["256.1.1.1", "no-such-host.invalid"])
def test_a_host_this_machine_cannot_listen_on_is_refused_before_anything_starts(host, served_runs, serve_data, no_server, capsys):
    code = main(["serve", str(served_runs["cnn"]), "--data-dir", str(serve_data), "--host", host])
    one_line_error(capsys, code, f"--host {host}")
    assert no_server == []


def test_missing_gradio_names_the_extra_to_install(served_runs, serve_data, no_server, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio now raises ImportError
    code = main(["serve", str(served_runs["cnn"]), "--data-dir", str(serve_data)])
    one_line_error(capsys, code, "vitlab serve needs gradio, which is not installed; install it with: pip install 'vitlab[serve]'")
    assert no_server == []


def test_good_runs_are_served_on_this_machine_only_by_default(served_runs, serve_data, no_server, capsys):
    pytest.importorskip("gradio")
    assert main(["serve", str(served_runs["cnn"]), str(served_runs["vit"]), "--data-dir", str(serve_data), "--port", "8123"]) == 0
    [(app, host, port)] = no_server
    assert (host, port) == ("127.0.0.1", 8123)
    assert "vitlab serve: 2 runs" in capsys.readouterr().out
    ids = {block.elem_id for block in app.blocks.values()}
    assert {"top5-0", "map-0", "top5-1", "map-1", "attention-1", "layer-1", "head-1", "confusion-0", "curves-1"} <= ids
    assert "attention-0" not in ids  # the CNN run has Grad-CAM, not attention
