"""The three notebooks are exactly what notebooks/make_notebooks.py writes (one source), carry no outputs,
and run headless from top to bottom on real CIFAR-10."""

import importlib.util
import json
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import real_cifar10_root

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
NAMES = ["vit_tutorial.ipynb", "attention_maps.ipynb", "model_comparison.ipynb"]


def notebook_source():
    spec = importlib.util.spec_from_file_location("make_notebooks", NOTEBOOKS / "make_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebook_is_what_the_source_writes(name):
    source = notebook_source()
    assert (NOTEBOOKS / name).read_text() == source.notebook_text(source.NOTEBOOKS[name.removesuffix(".ipynb")]), (
        f"notebooks/{name} differs from notebooks/make_notebooks.py: edit the cells there and run it")


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_committed_without_outputs(name):
    notebook = json.loads((NOTEBOOKS / name).read_text())
    code = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
    assert code and all(not cell["outputs"] and cell["execution_count"] is None for cell in code)


@pytest.mark.skipif(real_cifar10_root() is None, reason="the notebooks read real CIFAR-10: set VITLAB_DATA")
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_headless(name, tmp_path, monkeypatch):
    monkeypatch.delenv("VITLAB_RUN", raising=False)  # the notebooks then train their own small models
    monkeypatch.delenv("VITLAB_STUDY", raising=False)
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs if output.output_type == "error"]
    assert not errors
    printed = "".join(output.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs)
    assert printed  # the cells printed their shapes and numbers
