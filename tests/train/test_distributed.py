"""Data parallel through torchrun: two CPU processes (gloo) train like one process with the same global batch."""

import json
import subprocess
import sys

import pytest
import torch

from conftest import tiny_dataset
from vitlab.cli import main
from vitlab.data import DeviceBatches

# SGD, fp32, no dropout: the two-process run differs from the one-process run only in the order of
# floating-point sums (gradients are averaged over two half-batches instead of summed over one batch).
ARGS = ["train", "--model", "vit", "--patch_size", "8", "--hidden_size", "32", "--num_heads", "2", "--num_blocks", "2",
        "--subset", "300", "--test_subset", "100", "--epochs", "3", "--batch_size", "40", "--precision", "fp32",
        "--optimizer", "sgd", "--lr", "0.05", "--progress", "false",
        "--device", "cpu"]  # gloo: NCCL cannot put two ranks on one GPU
TOLERANCE = 1e-4  # relative, on each epoch's training loss; measured differences are ~1e-7


def test_shards_of_a_global_batch_are_exactly_its_halves():
    data = tiny_dataset(64)
    single = DeviceBatches(data.train_images, data.train_labels, 16, train=True, device=torch.device("cpu"), seed=3)
    halves = [DeviceBatches(data.train_images, data.train_labels, 16, train=True, device=torch.device("cpu"), seed=3, shard=(rank, 2))
              for rank in (0, 1)]
    orders = [single.new_order(), *(half.new_order() for half in halves)]
    for step in range(len(single)):
        images, labels = single.batch(step, orders[0])
        parts = [half.batch(step, order) for half, order in zip(halves, orders[1:], strict=True)]
        assert torch.equal(torch.cat([p[0] for p in parts]), images)
        assert torch.equal(torch.cat([p[1] for p in parts]), labels)


def test_a_batch_that_does_not_split_over_the_processes_is_refused():
    data = tiny_dataset(64)
    with pytest.raises(Exception, match="does not split evenly over 3 processes"):
        DeviceBatches(data.train_images, data.train_labels, 16, train=True, device=torch.device("cpu"), shard=(0, 3))


def test_two_processes_match_one_process_even_in_micro_batches(cifar_root, tmp_path):
    """Each process splits its 20 images into micro-batches of 8, 8 and 4 whose gradients it averages with the other
    process's only once (DDP's no_sync before the last); the one process takes its 40 at once."""
    import vitlab.data as data_module

    child = tmp_path / "child.py"
    child.write_text("import json, sys\nimport vitlab.data as d\nd.MD5.update(json.loads(sys.argv[1]))\n"
                     "from vitlab.cli import main\nsys.exit(main(sys.argv[2:]))\n")
    two = tmp_path / "two"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(child),
                             json.dumps(data_module.MD5), *ARGS, "--micro_batch_size", "8", "--data-dir", str(cifar_root),
                             "--out", str(two)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("test accuracy") == 1  # only rank 0 reports
    one = tmp_path / "one"
    torch.set_num_threads(1)
    assert main([*ARGS, "--data-dir", str(cifar_root), "--out", str(one)]) == 0
    curves = [[json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] for run in (one, two)]
    assert len(curves[0]) == len(curves[1]) == 3
    for single, double in zip(*curves, strict=True):
        assert double["train_loss"] == pytest.approx(single["train_loss"], rel=TOLERANCE)
        assert double["val_loss"] == pytest.approx(single["val_loss"], rel=TOLERANCE)
    results = json.loads((two / "results.json").read_text())
    assert results["processes"] == 2
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
