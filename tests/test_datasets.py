"""Your own data: a folder of real CIFAR-10 PNGs trains like the built-in loader, CIFAR-100 through files in its
format, and every command works on such runs; broken folders are one-line errors before any run folder is made."""

import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from vitlab import datasets
from vitlab.cli import main
from vitlab.data import CLASSES, load_cifar10

QUICK = ["--epochs", "3", "--batch-size", "64", "--progress", "false"]


def write_folder(root, split: str, images: torch.Tensor, labels: torch.Tensor, classes=CLASSES) -> None:
    for index, (image, label) in enumerate(zip(images, labels, strict=True)):
        folder = root / split / classes[int(label)]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{index:05d}.png")


@pytest.fixture
def png_folder(cifar_root, tmp_path):
    """2,000 CIFAR-10 training images as train/ (1,600) and val/ (400) PNG folders, and 500 test images as test/."""
    data = load_cifar10(cifar_root, subset=2000, test_subset=500)
    root = tmp_path / "pngs"
    write_folder(root, "train", data.train_images, data.train_labels)
    write_folder(root, "val", data.val_images, data.val_labels)
    write_folder(root, "test", data.test_images, data.test_labels)
    return root


def test_a_png_folder_trains_like_the_built_in_loader_and_every_command_works_on_it(png_folder, cifar_root, tmp_path, capsys):
    folder_run, builtin_run = tmp_path / "folder", tmp_path / "builtin"
    assert main(["train", "--model", "cnn-small", "--dataset", f"folder:{png_folder}", *QUICK, "--out", str(folder_run)]) == 0
    assert main(["train", "--model", "cnn-small", "--subset", "2000", "--test_subset", "500", "--data-dir", str(cifar_root), *QUICK,
                 "--out", str(builtin_run)]) == 0
    folder_results = json.loads((folder_run / "results.json").read_text())
    builtin_results = json.loads((builtin_run / "results.json").read_text())
    assert folder_results["train_images"] == builtin_results["train_images"] == 1600 and folder_results["test_images"] == 500
    assert folder_results["classes"] == list(CLASSES) and folder_results["dataset"] == "folder:pngs"
    assert abs(folder_results["test_acc"] - builtin_results["test_acc"]) < 6.0  # same images, other batch order: within noise
    assert folder_results["test_acc"] > 25.0  # well above chance
    model = json.loads((folder_run / "model.json").read_text())
    assert model["data"]["classes"] == list(CLASSES) and model["data"]["mean"] != [0.4914, 0.4822, 0.4465]
    capsys.readouterr()
    assert main(["evaluate", str(folder_run)]) == 0
    assert json.loads(capsys.readouterr().out)["test_acc"] == folder_results["test_acc"]
    picture = next((png_folder / "test" / "cat").glob("*.png"))
    assert main(["predict", str(folder_run), str(picture)]) == 0
    printed = capsys.readouterr().out.split(": ", 1)[1]  # after the file name, which itself names a class
    assert sum(name in printed for name in CLASSES) == 3  # the top 3 classes by name
    vit_run = tmp_path / "vit"
    assert main(["train", "--model", "vit", "--patch_size", "8", "--hidden_size", "16", "--num_heads", "2", "--num_blocks", "1",
                 "--dataset", f"folder:{png_folder}", "--epochs", "1", "--progress", "false", "--out", str(vit_run)]) == 0
    assert main(["attention", str(vit_run), "--images", "2", "--out", str(tmp_path / "attention")]) == 0
    assert main(["explain", str(folder_run), str(vit_run), "--images", "2", "--out", str(tmp_path / "explain")]) == 0
    assert (tmp_path / "explain" / "explain.png").is_file() and (tmp_path / "attention" / "attention_000.png").is_file()


def test_folder_images_of_another_size_are_resized_once_to_image_size(tmp_path, capsys):
    root = tmp_path / "big"
    generator = torch.Generator().manual_seed(0)
    for split, count in (("train", 60), ("test", 20)):
        labels = torch.arange(count) % 3
        images = (torch.randint(0, 40, (count, 3, 48, 40), generator=generator) + 70 * labels.view(-1, 1, 1, 1)).to(torch.uint8)
        write_folder(root, split, images, labels, classes=("red", "green", "blue"))
    run = tmp_path / "run"
    assert main(["train", "--model", "vit", "--patch_size", "4", "--hidden_size", "16", "--num_heads", "2", "--num_blocks", "1",
                 "--dataset", f"folder:{root}", "--image_size", "24", "--epochs", "2", "--batch-size", "16", "--progress", "false",
                 "--out", str(run)]) == 0
    results = json.loads((run / "results.json").read_text())
    assert results["classes"] == ["blue", "green", "red"] and results["train_images"] == 48  # 20% of train/ validates
    assert json.loads((run / "model.json").read_text())["config"]["image_size"] == 24
    small = tmp_path / "small"
    assert main(["train", "--model", "cnn-small", "--dataset", f"folder:{root}", "--image_size", "16", "--epochs", "1", "--progress", "false",
                 "--out", str(small)]) == 0
    capsys.readouterr()
    for command, message in ((["explain", str(run), str(small), "--images", "1"], "images of different sizes"),
                             (["explain", str(run), "--images", "1", "--steps", "1000"], "576 pixels")):
        assert main(command) == 2
        error = capsys.readouterr().err
        assert message in error and len(error.strip().splitlines()) == 1, error
    pytest.importorskip("onnxruntime")
    assert main(["export", str(run), "--onnx", str(tmp_path / "run.onnx")]) == 0  # checked on the run's own 24×24 test images
    assert "on 20 test images: top-1 agreement" in capsys.readouterr().out


def write_fake_cifar100(root) -> dict:
    folder = root / datasets.CIFAR100_FOLDER
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    palette = rng.integers(20, 235, size=(100, 3))
    for name, count in (("train", 1000), ("test", 200)):
        labels = rng.integers(0, 100, size=count)
        pixels = np.clip(palette[labels][:, :, None] + rng.normal(0, 10, size=(count, 3, 1024)), 0, 255).astype(np.uint8)
        with open(folder / name, "wb") as handle:
            pickle.dump({b"data": pixels.reshape(count, 3072), b"fine_labels": labels.tolist(),
                         b"coarse_labels": (labels // 5).tolist()}, handle, protocol=2)
    with open(folder / "meta", "wb") as handle:
        pickle.dump({b"fine_label_names": [f"class{i:02d}".encode() for i in range(100)]}, handle, protocol=2)
    import hashlib

    return {name: hashlib.md5((folder / name).read_bytes()).hexdigest() for name in datasets.CIFAR100_MD5}


def test_cifar100_trains_from_files_in_its_format(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(datasets, "CIFAR100_MD5", write_fake_cifar100(tmp_path / "data"))
    run = tmp_path / "run"
    assert main(["train", "--model", "cnn-small", "--dataset", "cifar100", "--data-dir", str(tmp_path / "data"), "--epochs", "2",
                 "--batch-size", "50", "--progress", "false", "--out", str(run)]) == 0
    results = json.loads((run / "results.json").read_text())
    assert len(results["per_class_acc"]) == 100 and results["classes"][7] == "class07" and results["test_images"] == 200
    assert json.loads((run / "model.json").read_text())["config"]["num_classes"] == 100
    capsys.readouterr()
    assert main(["evaluate", str(run), "--figures"]) == 0
    assert (run / "figures" / "confusion.png").is_file()
    damaged = tmp_path / "data" / datasets.CIFAR100_FOLDER / "test"
    damaged.write_bytes(damaged.read_bytes()[:-10])
    assert main(["train", "--model", "cnn-small", "--dataset", "cifar100", "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "x")]) == 2
    assert "fails its checksum" in capsys.readouterr().err and not (tmp_path / "x").exists()


@pytest.mark.parametrize(("break_it", "message"), [
    (lambda root: (root / "train" / "cat").mkdir(), "holds no images"),
    (lambda root: (root / "train" / "bird" / "broken.png").write_text("not a png"), "is not a readable image"),
    (lambda root: write_folder(root, "test", torch.zeros(1, 3, 8, 8, dtype=torch.uint8), torch.tensor([0]), classes=("zebra",)),
     "has other classes than train/"),
    (lambda root: __import__("shutil").rmtree(root / "train" / "bird"), "at least two classes"),
])
def test_broken_folders_are_one_line_errors_and_no_run_folder(tmp_path, break_it, message, capsys):
    root = tmp_path / "data"
    write_folder(root, "train", torch.zeros(10, 3, 8, 8, dtype=torch.uint8), torch.tensor([2] * 5 + [6] * 5))  # bird and frog
    break_it(root)
    out = tmp_path / "run"
    assert main(["train", "--model", "cnn-small", "--dataset", f"folder:{root}", "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert message in error and len(error.strip().splitlines()) == 1, error
    assert not out.exists()


def test_a_folder_too_small_to_leave_test_images_is_refused_before_training(tmp_path, capsys):
    root = tmp_path / "data"
    write_folder(root, "train", torch.zeros(2, 3, 8, 8, dtype=torch.uint8), torch.tensor([2, 6]))
    out = tmp_path / "run"
    assert main(["train", "--model", "cnn-small", "--dataset", f"folder:{root}", "--val_fraction", "0.5", "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert "no test images" in error and len(error.strip().splitlines()) == 1, error
    assert not out.exists()


def test_16_bit_grey_images_are_scaled_to_8_bits_not_clipped_to_white(tmp_path):
    from PIL import Image

    gradient = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (64, 1))
    path = tmp_path / "wide.png"
    Image.fromarray(gradient).save(path)
    assert Image.open(path).mode in datasets.WIDE_INTEGER_MODES
    pixels = datasets.decode_image(path, 64)
    assert pixels.shape == (3, 64, 64) and pixels[:, :, 0].max() <= 1 and pixels[:, :, -1].min() >= 254
    assert abs(float(pixels.mean()) - 127.5) < 2  # a 0..65535 gradient: mid-grey on average, not white


def test_image_files_that_are_not_images_are_refused_with_the_reason(tmp_path):
    from PIL import Image, PngImagePlugin

    from vitlab.inspect.images import load_image_file

    text = PngImagePlugin.PngInfo()
    text.add_text("comment", "x" * (PngImagePlugin.MAX_TEXT_CHUNK + 10), zip=True)  # more than PIL will decompress
    bomb = tmp_path / "text.png"
    Image.new("RGB", (4, 4)).save(bomb, pnginfo=text)
    with pytest.raises(ValueError, match=r"text.png: not a readable image \(ValueError: Decompressed data too large"):
        load_image_file(bomb)
    with pytest.raises(ValueError, match="not a regular file"):
        load_image_file("/dev/null")
    (tmp_path / "loop.png").symlink_to(tmp_path / "loop.png")
    with pytest.raises(ValueError, match="looping symbolic link"):
        load_image_file(tmp_path / "loop.png")
