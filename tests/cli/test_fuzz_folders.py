"""Fuzzing damaged folders (Part C of issue #14): every file of a finished run folder and of a study folder
is truncated, overwritten with random bytes, or given JSON fields of the wrong type or absurd values, and
every command that reads it is run. Each must exit 0 or give one-line errors (exit 2), never a traceback.

`make test` tries a few dozen damages per folder; `pytest tests/cli/test_fuzz_folders.py --slow` tries many more.
"""

import json
import shutil

import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_fuzz import TINY_VIT, check_outcome, fuzz_settings, run_cli, tiny_training_flags

from vitlab.cli import main

ABSURD = [None, True, "text", -1, 0, 1e308, -1e308, [], {}, [1, "a"], {"x": 1}, 2**70, "NaN", ""]


def damage_strategy(files: list[str]):
    kinds = st.sampled_from(["truncate", "random_bytes", "json_field", "json_type", "empty", "delete"])
    return st.tuples(st.sampled_from(files), kinds, st.integers(0, 10**6), st.sampled_from(ABSURD))


def apply_damage(path, kind: str, number: int, value) -> None:
    if not path.is_file():
        return
    data = path.read_bytes()
    if kind == "truncate":
        path.write_bytes(data[: number % max(len(data), 1)])
    elif kind == "random_bytes":
        start = number % max(len(data), 1)
        path.write_bytes(data[:start] + bytes((number * 7 + i) % 256 for i in range(16)) + data[start + 16:])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "delete":
        path.unlink()
    elif path.suffix == ".json":
        try:
            content = json.loads(data)
        except ValueError:
            return
        if kind == "json_type" or not isinstance(content, dict) or not content:
            path.write_text(json.dumps(value))
            return
        keys = sorted(content)
        key = keys[number % len(keys)]
        if isinstance(content[key], dict) and content[key] and number % 2:
            inner = sorted(content[key])
            content[key][inner[number // 2 % len(inner)]] = value
        else:
            content[key] = value
        path.write_text(json.dumps(content))
    elif path.suffix == ".jsonl":
        lines = data.decode(errors="replace").splitlines() or [""]
        lines[number % len(lines)] = json.dumps(value)
        path.write_text("\n".join(lines) + "\n")


@pytest.fixture
def pristine(small_cifar_root, tmp_path_factory):
    root = tmp_path_factory.mktemp("pristine")
    common = tiny_training_flags(small_cifar_root, epochs=2)
    assert main(["train", *TINY_VIT, *common, "--out", str(root / "run")]) == 0
    assert main(["compare", "cnn-small", "mlp:hidden_size=8", *common, "--seeds", "2", "--out", str(root / "study")]) == 0
    from PIL import Image

    Image.new("RGB", (32, 32), (10, 200, 30)).save(root / "picture.png")
    return root


def test_commands_on_a_damaged_run_folder(pristine, small_cifar_root, tmp_path, fuzz_examples):
    files = sorted(str(path.relative_to(pristine / "run")) for path in (pristine / "run").rglob("*") if path.is_file())
    data = ["--data-dir", str(small_cifar_root)]
    counter = iter(range(10**9))

    @fuzz_settings(fuzz_examples)
    @given(damage=damage_strategy(files), command=st.sampled_from(["evaluate", "predict", "attention", "explain", "export", "gif", "resume"]))
    def fuzz(damage, command):
        run = tmp_path / f"run{next(counter)}"
        shutil.copytree(pristine / "run", run)
        name, kind, number, value = damage
        apply_damage(run / name, kind, number, value)
        if command == "resume":
            (run / "results.json").unlink(missing_ok=True)
        argv = {
            "evaluate": ["evaluate", str(run), *data],
            "predict": ["predict", str(run), str(pristine / "picture.png")],
            "attention": ["attention", str(run), "--images", "1", *data, "--out", str(tmp_path / "figures")],
            "explain": ["explain", str(run), "--images", "1", *data, "--out", str(tmp_path / "figures")],
            "export": ["export", str(run), "--onnx", str(tmp_path / "model.onnx"), "--check-images", "5", *data],
            "gif": ["gif", str(run), "--out", str(tmp_path / "again.gif")],
            "resume": ["train", "--resume", str(run)],
        }[command]
        status, error = run_cli(argv)
        check_outcome(status, error, argv)
        shutil.rmtree(run, ignore_errors=True)

    fuzz()


def test_report_on_a_damaged_study_folder(pristine, tmp_path, fuzz_examples):
    study_root = pristine / "study"
    files = sorted(str(path.relative_to(study_root)) for path in study_root.rglob("*")
                   if path.is_file() and path.name != ".lock" and path.suffix in (".json", ".jsonl", ".safetensors"))
    counter = iter(range(10**9))

    @fuzz_settings(fuzz_examples)
    @given(damage=damage_strategy(files), html=st.booleans())
    def fuzz(damage, html):
        study = tmp_path / f"study{next(counter)}"
        shutil.copytree(study_root, study)
        name, kind, number, value = damage
        apply_damage(study / name, kind, number, value)
        argv = ["report", str(study)] + (["--html"] if html else [])
        status, error = run_cli(argv)
        check_outcome(status, error, argv)
        shutil.rmtree(study, ignore_errors=True)

    fuzz()
