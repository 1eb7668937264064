"""Property-based fuzzing of the command line (Part C of issue #14).

For every command, hypothesis draws flag values: numbers at and beyond their ranges, nan/inf, huge
integers, Unicode digits and letters, empty strings, paths that are files, folders, missing or
unwritable. Every outcome must be exit 0, or exit 2 with exactly one line on stderr and no traceback,
and a refused `train` leaves no run folder behind that blocks running it again.

`make test` tries a few dozen inputs per command; `pytest tests/cli/test_fuzz.py --slow` tries 400.
"""

import contextlib
import io
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vitlab.cli import main
from vitlab.rundir import RunDir

WEIRD = ["", " ", "nan", "inf", "-inf", "1e309", "-1", "0", "-0", "٣", "３", "Ⅻ", "abc", "1.5", "2**70", str(2**70), "0x10",
         "1_000", "true", "none", "None", "1e-300", "-1e-9", "é", "😀", "--", "1,2", "8/16"]
TEXT = st.one_of(st.sampled_from(WEIRD), st.integers(-5, 5).map(str), st.floats(-10, 10, allow_nan=False).map(str),
                 st.text(max_size=5))
TRAIN_FLAGS = ["lr", "weight_decay", "warmup_epochs", "label_smoothing", "mixup", "cutmix", "grad_clip", "seed", "batch_size", "epochs",
               "subset", "train_size", "test_subset", "val_fraction", "crop_padding", "random_erasing", "hidden_size", "dropout",
               "num_hidden_layers", "precision", "device", "optimizer", "schedule", "eval_batch_size", "beta1", "beta2", "momentum",
               "min_lr_ratio", "norm_bias_lr_scale", "images_budget", "split_seed", "trivial_augment", "flip", "tta", "channels_last"]
# Values that are valid but would make a fuzzed run long or large are drawn from their small ranges only.
SMALL = {"epochs": st.integers(1, 2), "batch_size": st.integers(8, 64), "subset": st.integers(50, 300), "train_size": st.integers(1, 200),
         "test_subset": st.integers(1, 120), "eval_batch_size": st.integers(16, 200), "hidden_size": st.integers(1, 16),
         "num_hidden_layers": st.integers(1, 2), "images_budget": st.integers(1, 400)}
def fuzz_settings(examples: int) -> settings:
    return settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None)


TINY_VIT = ["--model", "vit", "--patch_size", "8", "--hidden_size", "8", "--num_heads", "2", "--num_blocks", "1", "--gif", "true"]


def tiny_training_flags(data_root, epochs: int) -> list[str]:
    """Flags for a run of a few seconds on 200 images, the fuzzers' finished runs."""
    return ["--subset", "200", "--test_subset", "50", "--epochs", str(epochs), "--batch_size", "50", "--progress", "false",
            "--data-dir", str(data_root)]


def run_cli(argv: list[str]) -> tuple[int, str]:
    stderr, stdout = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(stdout):
        try:
            status = main(argv)
        except SystemExit as exit_:  # argparse refusing a flag
            status = exit_.code
    return status, stderr.getvalue()


def check_outcome(status: int, error: str, argv: list[str]) -> None:
    """Exit 0, or exit 2 with one error line (commands given several files: one line per file they could not read)."""
    assert "Traceback" not in error, (argv, error)
    assert status in (0, 2), (argv, status, error)
    lines = error.strip().splitlines()
    if status == 2:
        assert lines and all(line.startswith(f"vitlab {argv[0]}: error: ") for line in lines), (argv, error)
        files = sum(1 for part in argv[1:] if not part.startswith("-"))
        assert len(lines) == 1 or (argv[0] in ("predict", "attention", "explain") and len(lines) <= files), (argv, error)


def flag_value(name: str):
    small = SMALL.get(name)
    return st.one_of(TEXT, small.map(str)) if small is not None else TEXT


@st.composite
def train_flags(draw) -> list[str]:
    names = draw(st.lists(st.sampled_from(TRAIN_FLAGS), min_size=1, max_size=3, unique=True))
    return [part for name in names for part in (f"--{name}", draw(flag_value(name)))]


def test_train_with_fuzzed_flags(small_cifar_root, tmp_path, fuzz_examples):
    base = ["train", "--model", "mlp", "--hidden_size", "8", "--subset", "200", "--test_subset", "50", "--epochs", "1",
            "--batch_size", "50", "--progress", "false", "--data-dir", str(small_cifar_root)]
    counter = iter(range(10**9))

    @fuzz_settings(fuzz_examples)
    @given(flags=train_flags())
    def fuzz(flags):
        out = tmp_path / f"run{next(counter)}"
        argv = base + flags + ["--out", str(out)]
        status, error = run_cli(argv)
        check_outcome(status, error, argv)
        if status != 0 and out.exists():  # refused mid-run: the folder must not block running the command again
            assert RunDir(out).state() in ("new", "resumable"), argv
            if RunDir(out).state() == "new":
                RunDir(out).prepare()
        shutil.rmtree(out, ignore_errors=True)

    fuzz()


@pytest.fixture
def finished_runs(small_cifar_root, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz-runs")
    common = tiny_training_flags(small_cifar_root, epochs=1)
    assert main(["train", *TINY_VIT, *common, "--out", str(root / "vit")]) == 0
    assert main(["train", "--model", "cnn-small", *common, "--out", str(root / "cnn")]) == 0
    image = root / "picture.png"
    from PIL import Image

    Image.new("RGB", (40, 30), (200, 30, 30)).save(image)
    (root / "not-an-image.png").write_text("hello")
    (root / "a-folder").mkdir()
    return root


def test_inspection_commands_with_fuzzed_arguments(finished_runs, small_cifar_root, tmp_path, fuzz_examples):
    vit, cnn = str(finished_runs / "vit"), str(finished_runs / "cnn")
    paths = st.sampled_from([vit, cnn, str(finished_runs / "picture.png"), str(finished_runs / "not-an-image.png"),
                             str(finished_runs / "a-folder"), str(finished_runs / "missing"), "/proc/1/nonexistent", "", "/"])
    data = ["--data-dir", str(small_cifar_root)]
    commands = st.one_of(
        st.tuples(st.just("attention"), st.sampled_from([vit, cnn]), st.sampled_from(["--images", "--layer", "--head", "--method"]), TEXT)
        .map(lambda t: ["attention", t[1], t[2], t[3], *data, "--out", str(tmp_path / "figures")]),
        st.tuples(paths, paths).map(lambda t: ["predict", vit, t[0], t[1]]),
        st.tuples(TEXT).map(lambda t: ["predict", cnn, str(finished_runs / "picture.png"), "--top", t[0]]),
        st.tuples(paths, TEXT).map(lambda t: ["evaluate", t[0], "--device", t[1], *data]),
        st.tuples(paths, paths).map(lambda t: ["explain", t[0], t[1], "--images", "1", *data, "--out", str(tmp_path / "explain")]),
        st.tuples(TEXT).map(lambda t: ["gif", vit, "--out", t[0] or "x"]),
        st.tuples(paths).map(lambda t: ["gif", t[0]]),
        st.tuples(TEXT).map(lambda t: ["export", cnn, "--onnx", str(tmp_path / "m.onnx"), "--check-images", t[0], *data]),
        st.tuples(paths).map(lambda t: ["train", "--resume", t[0]]),
    )

    @fuzz_settings(fuzz_examples * 3)
    @given(argv=commands)
    def fuzz(argv):
        status, error = run_cli(argv)
        check_outcome(status, error, argv)

    fuzz()
    assert RunDir(vit).state() == "finished" and RunDir(cnn).state() == "finished"  # nothing a command did damaged the runs


SPEC_NAMES = st.sampled_from(["cnn-small", "mlp", "vit", "vit-seed001", "aircnn", "resnet", "", "vit:"])
SPEC_KEYS = st.sampled_from(["patch_size", "hidden_size", "lr", "epochs", "train_size", "widths", "channels", "seed", "num_classes",
                             "depth", "", "lr=1", "pool", "norm"])


@st.composite
def specs(draw) -> str:
    name = draw(SPEC_NAMES)
    items = [f"{draw(SPEC_KEYS)}={draw(TEXT)}" for _ in range(draw(st.integers(0, 2)))]
    return name + (":" + ",".join(items) if items else "")


def test_study_plans_with_fuzzed_specs_and_vary(fuzz_examples):
    from vitlab.errors import VitlabError
    from vitlab.study.plan import parse_spec, plan_study

    @fuzz_settings(fuzz_examples * 4)
    @given(spec_list=st.lists(specs(), min_size=1, max_size=3), vary=st.one_of(st.none(), st.tuples(SPEC_KEYS, TEXT, TEXT).map(
        lambda t: f"{t[0]}={t[1]},{t[2]}")), seeds=st.integers(-1, 3))
    def fuzz(spec_list, vary, seeds):
        try:
            plan = plan_study(spec_list, {"epochs": 1}, None, seeds, vary=vary)
        except VitlabError as error:
            assert "\n" not in str(error) and str(error)
            return
        assert len({spec for spec in plan.specs}) == len(plan.specs)  # no two SPECs share a run folder
        for spec in plan.specs:
            assert plan.run_config(parse_spec(spec), plan.seeds[0]).train.epochs == 1

    fuzz()
