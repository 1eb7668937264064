"""The three notebooks run headless from top to bottom (on real CIFAR-10) and are committed without outputs."""

import json
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import real_cifar10_root

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
NAMES = ["vit_tutorial.ipynb", "attention_maps.ipynb", "model_comparison.ipynb"]


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
