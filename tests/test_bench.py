"""The benchmark harness runs (one step of each side); speed itself is measured, not tested."""

import itertools
import json
import sys
from pathlib import Path

import pytest
import torch

from conftest import real_cifar10_root, tiny_dataset
from vitlab.config import TrainConfig
from vitlab.kernels import cores
from vitlab.models import build_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench  # noqa: E402


def test_flop_count_of_a_linear_model_by_hand():
    model = build_model("mlp", hidden_size=8, num_hidden_layers=0)  # one 3072→10 linear layer
    # forward 2·3072·10; backward the same again for the weight gradient (images need no gradient)
    assert bench.train_flops_per_image(model) == pytest.approx(2 * 2 * 3072 * 10, rel=0.01)


def test_vitlab_side_times_a_few_steps_and_breaks_them_down():
    config = TrainConfig(batch_size=32, device="cpu", progress=False)
    probes, core_probes = iter([1.5, 2.5]), iter([60.0, 330.0])
    speed, precision, peaks, details = bench.time_vitlab(build_model("cnn-small"), tiny_dataset(), config, steps=2, warmup=1,
                                                         profile_steps=2, probe_peak=lambda: next(probes),
                                                         probe_cores=lambda: next(core_probes))
    assert speed > 0 and precision in ("fp32", "bf16") and peaks == (1.5, 2.5)  # probed once before and once after
    assert details["core_round_trips_ns"] == (60.0, 330.0)
    assert 0 < details["matmul_share"] < 1 and details["non_matmul"] and details["bytes_per_step"] > 32 * 3 * 32 * 32
    shares = details["step_shares"]
    assert set(shares) == {"c_kernels", "pytorch_operators", "outside_operators"} and all(0 <= v <= 1 for v in shares.values())
    assert shares["pytorch_operators"] > 0
    assert shares["outside_operators"] == pytest.approx(max(0.0, 1 - shares["c_kernels"] - shares["pytorch_operators"]))
    assert details["bytes_complete"]  # cnn-small's kernels are PyTorch operators (or the batch's augmentation)


def test_the_c_kernel_share_counts_the_kernels_calls_and_nothing_else():
    from vitlab.kernels import gelu

    x = torch.randn(4096, 64).to(torch.bfloat16)
    if not gelu.kernel_supports(x):
        pytest.skip("no AVX-512 C kernels on this machine")
    share, called = bench.c_kernel_time(lambda: gelu.gelu_forward(x), steps=3)
    assert 0 < share <= 1 and called == {"vitlab_gelu_forward"}
    share, called = bench.c_kernel_time(lambda: torch.nn.functional.gelu(x.float()), steps=3)
    assert share == 0 and not called


def test_the_roofline_verdict_follows_the_ridge_point():
    assert bench.bound(28.0, 12.0) == "compute" and bench.bound(3.0, 12.0) == "memory"
    assert "vitlab_attention_forward" not in bench.BYTES_COUNTED_C_FUNCTIONS  # a plain call: its bytes are not counted
    assert "vitlab_relu_max_pool_backward_bf16" in bench.BYTES_COUNTED_C_FUNCTIONS


def test_byte_counter_counts_what_an_operator_reads_and_writes():
    a, b = torch.ones(100, 50), torch.ones(50, 20)
    assert bench.bytes_per_step(lambda: a @ b) == (100 * 50 + 50 * 20 + 100 * 20) * 4


def test_byte_counter_leaves_out_views_and_allocations():
    a = torch.ones(100, 50)
    assert bench.bytes_per_step(lambda: (a.t(), a.view(50, 100), a.unfold(0, 10, 1), a[:, 1:], torch.empty(1000))) == 0
    assert bench.bytes_per_step(lambda: a.t().contiguous()) == 2 * 100 * 50 * 4  # a copy reads and writes
    index = torch.tensor([3, 7])
    assert bench.bytes_per_step(lambda: a.index_select(0, index)) == 2 * 2 * 50 * 4 + 2 * 8  # picked rows in and out, the index


def test_gpu_suite_dry_run_builds_every_step(tmp_path):
    """The GPU suite stays runnable on machines without a GPU: its dry run parses every command and takes one step."""
    import gpu_suite

    gpu_suite.dry_run(tmp_path)
    plan = gpu_suite.train_plan(tmp_path, 200)
    assert "vit-best" in plan["phase_one"] and "seed-study" in plan["phase_two"]


def test_gpu_records_dry_run_parses_every_command_and_its_epochs_fit(tmp_path):
    import gpu_records

    gpu_records.dry_run(tmp_path)
    epochs = gpu_records.vit_best_epochs(seconds=400, images_per_second=7_000)
    assert epochs * gpu_records.train_images("vit-best") * gpu_records.EPOCH_OVERHEAD / 7_000 <= 400
    assert gpu_records.vit_best_step_speed(steps=1, warmup=1) > 0  # the probe's step builds and runs (here on the CPU)


def test_gpu_followup_dry_run_parses_every_command(tmp_path):
    """The second GPU session's script stays runnable: its commands parse, the control arm runs vitlab
    through `python -c`, and the vit-best candidates' epochs fit the time they are given."""
    import gpu_followup

    commands = gpu_followup.dry_run(tmp_path, tmp_path / "study", budget=440)
    assert {"seed-study", "vit-fast-seed2", "vit-fast-cudnn-seed1"} <= set(commands)
    assert commands["vit-fast-cudnn-seed0"][1] == "-c" and "CUDA_SDPA_BACKENDS = None" in commands["vit-fast-cudnn-seed0"][2]
    epochs = gpu_followup.candidate_epochs(images_per_second=12_000, seconds=400)
    assert epochs * 40_000 / 12_000 * gpu_followup.SLOWDOWN <= 400
    assert gpu_followup.candidate_epochs(images_per_second=1e9, seconds=400) == 200


def test_device_data_rebuilds_a_batch_file_byte_for_byte(tmp_path):
    """CIFAR-10 travels to a GPU machine as WebP mosaics; unpacking must give back the very same file."""
    import pickle

    import device_data
    import numpy as np

    rng = np.random.default_rng(0)
    batch = {b"batch_label": b"testing batch 1 of 1", b"labels": list(rng.integers(0, 10, 12)),
             b"data": rng.integers(0, 256, (12, 3072), dtype=np.uint8), b"filenames": [b"img%d.png" % i for i in range(12)]}
    source = tmp_path / "cifar-10-batches-py"
    source.mkdir()
    (source / "test_batch").write_bytes(pickle.dumps(batch, protocol=4))
    (source / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"cat"]}, protocol=4))
    device_data.pack(source, tmp_path / "packed", parts=1)
    assert device_data.mosaic_shape(12) == (3, 4) and device_data.mosaic_shape(10_000) == (100, 100)
    assert device_data.unpack(tmp_path / "packed" / "part1", tmp_path / "rebuilt") == 0
    for name in ("test_batch", "batches.meta"):
        assert (tmp_path / "rebuilt" / name).read_bytes() == (source / name).read_bytes()
    (tmp_path / "packed" / "part1" / "test_batch.pre").write_bytes(b"x")  # damaged in transit
    assert device_data.unpack(tmp_path / "packed" / "part1", tmp_path / "again") == 1
    assert not (tmp_path / "again" / "test_batch").exists()


@pytest.mark.skipif(real_cifar10_root() is None, reason="the reference side reads the real CIFAR-10 files through torchvision")
def test_reference_side_times_a_few_steps():
    loader = bench.reference_loader(str(real_cifar10_root()), batch_size=16)
    torch.manual_seed(0)
    vit = bench.build_reference("vit", {"hidden_size": 16, "num_heads": 2, "num_blocks": 1, "dropout": 0.1})
    assert bench.time_reference(vit, loader, steps=2, warmup=1) > 0


@pytest.mark.parametrize("name", sorted(set(bench.CONFIGS) - bench.WITHOUT_REFERENCE))
def test_reference_models_are_the_same_size_as_vitlabs(name):
    """Written separately, the seeds' way; within 1% of vitlab's parameters (the seeds' CNN has conv
    biases before BatchNorm, their ViT a position for the CLS token) and the same output."""
    model_name, model_config = bench.CONFIGS[name]
    model_config = bench.with_dropout(model_name, model_config, None)
    reference = bench.build_reference(model_name, model_config)
    ours = build_model(model_name, **model_config)
    reference_params = sum(p.numel() for p in reference.parameters())
    assert abs(reference_params - ours.num_parameters) <= 0.01 * ours.num_parameters
    outputs = reference.eval()(torch.randn(2, 3, 32, 32))
    logits = outputs[0] if isinstance(outputs, tuple) else outputs
    assert logits.shape == (2, 10)


def test_the_optimizer_and_batch_timing_runs_muon_and_sgd():
    import optimizer_batch_speed

    for optimizer in ("sgd", "muon"):
        assert optimizer_batch_speed.images_per_second("aircnn", optimizer, batch_size=4, images=8) > 0
    assert optimizer_batch_speed.images_per_second("aircnn", "muon", batch_size=4, images=8, micro_batch_size=2) > 0


def test_cnn_fast_step_variants_name_their_settings_and_refuse_unknown_parts():
    import cnn_fast_step

    from vitlab.errors import VitlabError

    assert cnn_fast_step.settings_of("whole") == ({"micro_batch_size": 0}, False)
    assert cnn_fast_step.settings_of("micro500-frozen-compile") == ({"micro_batch_size": 500, "compile": True}, True)
    with pytest.raises(VitlabError, match="unknown variant part 'micro'"):
        cnn_fast_step.settings_of("micro")


def test_the_attention_kernel_and_matmul_shape_timings_run(capsys):
    import attention_kernels
    import matmul_shapes

    assert attention_kernels.forward_backward_ms(attention_kernels.explicit, (2, 2, 9, 4), repeats=1, rounds=1) > 0
    query, key, value = torch.randn(3, 2, 2, 9, 4).unbind(0)
    torch.testing.assert_close(attention_kernels.explicit(query, key, value), attention_kernels.fused_in_fp32(query, key, value))
    assert matmul_shapes.tflop_s(16, 16, 16, repeats=1, rounds=1) > 0


def test_main_reports_the_share_of_the_peak_probed_around_each_measurement(tmp_path, monkeypatch, capsys):
    probes = itertools.count(1)  # 1, 2, 3, ... TFLOP/s: the start-of-run probes, then before/after each round
    monkeypatch.setattr(bench, "matmul_peak", lambda dtype, device, size=2048: float(next(probes)))
    monkeypatch.setattr(bench, "copy_bandwidth", lambda device: 10.0)
    monkeypatch.setattr(bench, "locate_cifar10", lambda data_dir, download_if_missing=False: tmp_path / "cifar-10-batches-py")
    monkeypatch.setattr(bench, "load_cifar10", lambda root: tiny_dataset())
    trips = itertools.count(100, 100)  # 100, 200, ... ns: the start-of-run probe, then before/after each round
    monkeypatch.setattr(cores, "core_round_trip_ns", lambda: float(next(trips)))
    monkeypatch.setattr(sys, "argv", ["bench.py", "--configs", "cnn-small", "--skip-reference", "--steps", "1", "--warmup", "0",
                                      "--rounds", "2", "--profile-steps", "1", "--batch-size", "32", "--json", str(tmp_path / "out.json")])
    bench.main()
    result = json.loads((tmp_path / "out.json").read_text())
    row = result["rows"][0]
    assert result["core_round_trip_ns"] == 100.0
    # the best round's: probed just before and just after it, as the peaks
    assert row["core_round_trips_ns"] == ([200.0, 300.0] if row["local_bf16_peaks"] == [3.0, 4.0] else [400.0, 500.0])
    before, after = row["local_bf16_peaks"]
    assert (before, after) in ((3.0, 4.0), (5.0, 6.0))  # probes 1 and 2 were the start-of-run bf16 and fp32 peaks
    assert row["share_of_local_bf16_peak"] == pytest.approx(row["vitlab_tflop_s"] / ((before + after) / 2))
    assert row["share_of_bf16_peak"] == pytest.approx(row["vitlab_tflop_s"] / 1.0)
    assert 0 < row["matmul_share_of_op_time"] < 1
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| cnn-small")]
    assert len(table) == 1 and table[0].count("|") == 16
    assert f"| {row['core_round_trips_ns'][0]:.0f} / {row['core_round_trips_ns'][1]:.0f} |" in table[0]


def test_a_compiled_steps_fused_kernels_count_as_one_non_matmul_operator():
    """torch.compile's generated kernels are not aten ops; the breakdown must still see their time."""
    weight = torch.randn(64, 64)
    step = torch.compile(lambda x: torch.nn.functional.gelu(x @ weight).mul(2.0).add(1.0).sum())
    inputs = torch.randn(256, 64)
    step(inputs)  # compiled here, outside the profile
    matmul_share, others, _ = bench.non_matmul_breakdown(lambda: step(inputs), steps=2)
    assert 0 < matmul_share < 1
    assert "compiled fused kernels" in dict(others)


def test_vitlabs_c_kernels_count_in_the_breakdown_forward_and_backward_together():
    from vitlab.kernels.attention import kernel_supports
    from vitlab.models.layers import self_attention

    qkv = torch.randn(8, 65, 3, 4, 16).to(torch.bfloat16).requires_grad_()
    if not kernel_supports(qkv):
        pytest.skip("no AVX-512 BF16 C kernels on this machine")

    from vitlab.models.activations import GELU
    from vitlab.models.norms import MatmulInputNorm

    norm, tokens = MatmulInputNorm(64), torch.randn(8, 65, 64, requires_grad=True)

    def step():
        out, _ = self_attention(qkv)
        out.float().sum().backward()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            GELU()(norm(tokens)).float().sum().backward()
            total, normalised = norm.after_residual(tokens, out.detach(), torch.zeros(64))
            (total.sum() + normalised.float().sum()).backward()

    matmul_share, others, _ = bench.non_matmul_breakdown(step, steps=2, rows=20)
    assert matmul_share == 0 and {"C attention", "C layer norm", "C residual add + layer norm", "C GELU"} <= set(dict(others))
    assert not any(name.startswith("Kernel") for name in dict(others))


def test_a_block_run_as_one_node_shows_its_parts_in_the_breakdown_as_they_show_unfused():
    from vitlab.kernels.attention import kernel_supports
    from vitlab.models.fused_block import blocks_as_separate_nodes

    if not kernel_supports(torch.zeros(2, 65, 3, 4, 16, dtype=torch.bfloat16)):
        pytest.skip("no AVX-512 BF16 C kernels on this machine")
    torch.manual_seed(0)
    model = build_model("vit", patch_size=4, hidden_size=64, num_heads=4, num_blocks=2, pool="mean").train()
    images = torch.randn(4, 3, 32, 32)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(images).float().sum().backward()

    fused_share, fused_others, _ = bench.non_matmul_breakdown(step, steps=2, rows=20)
    with blocks_as_separate_nodes():
        separate_share, separate_others, _ = bench.non_matmul_breakdown(step, steps=2, rows=20)
    parts = {"C attention", "C layer norm", "C residual add + layer norm", "C GELU"}
    assert parts <= set(dict(fused_others)) and parts <= set(dict(separate_others))
    assert 0 < fused_share < 1 and 0 < separate_share < 1


def test_every_c_kernel_function_has_a_name_in_the_breakdown():
    """Each autograd Function that runs a C kernel (vitlab's Kernel… classes) is counted under a name of its own: one
    left out would count as no operator at all, and its time would vanish from the breakdown."""
    import importlib
    import pkgutil

    import vitlab.models

    functions = set()
    for module_info in pkgutil.iter_modules(vitlab.models.__path__):
        module = importlib.import_module(f"vitlab.models.{module_info.name}")
        functions |= {name for name, value in vars(module).items() if name.startswith("Kernel") and isinstance(value, type)
                      and issubclass(value, torch.autograd.Function)}
    assert {"KernelSelfAttention", "KernelBatchNorm", "KernelReLUMaxPool"} <= functions
    pool_operators = {"KernelReLUMaxPool", "KernelMaxPool"}  # counted as the PyTorch operators they call
    assert functions - pool_operators <= set(bench.C_KERNELS)


def test_the_linear_layer_kernels_count_as_matmul_time():
    from vitlab.kernels.weight_gradient import kernel_supports
    from vitlab.models.linear import linear

    if not kernel_supports(64, 64, True):
        pytest.skip("no AVX-512 BF16 C kernels on this machine")
    weight, bias = torch.randn(64, 64, requires_grad=True), torch.randn(64, requires_grad=True)
    x = torch.randn(4096, 64).to(torch.bfloat16)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = linear(x, weight, bias)
        out.float().sum().backward()

    step()
    only_kernel, _, _ = bench.non_matmul_breakdown(step, steps=2)
    bench.MATMUL_C_KERNELS.discard("KernelLinear")
    try:
        without_it, others, _ = bench.non_matmul_breakdown(step, steps=2, rows=20)
    finally:
        bench.MATMUL_C_KERNELS.add("KernelLinear")
    assert "C linear layer" in dict(others) and without_it < only_kernel


def test_compile_both_times_every_configuration_eager_and_compiled_in_the_same_rounds(tmp_path, monkeypatch):
    timed = []

    def fake_time_vitlab(model, data, config, steps, warmup, profile_steps=0, probe_peak=None, probe_cores=None):
        timed.append(config.compile)
        return (200.0 if config.compile else 100.0), "bf16", (1.0, 1.0), {}

    monkeypatch.setattr(bench, "time_vitlab", fake_time_vitlab)
    monkeypatch.setattr(bench, "matmul_peak", lambda dtype, device, size=2048: 1.0)
    monkeypatch.setattr(bench, "copy_bandwidth", lambda device: 10.0)
    monkeypatch.setattr(bench, "locate_cifar10", lambda data_dir, download_if_missing=False: tmp_path / "cifar-10-batches-py")
    monkeypatch.setattr(bench, "load_cifar10", lambda root: tiny_dataset())
    monkeypatch.setattr(sys, "argv", ["bench.py", "--configs", "cnn-small", "--skip-reference", "--rounds", "2", "--compile", "both",
                                      "--json", str(tmp_path / "out.json")])
    bench.main()
    assert timed == [False, True, False, True]  # alternating within each round
    rows = json.loads((tmp_path / "out.json").read_text())["rows"]
    assert [(row["compiled"], row["vitlab_img_s"], row["rounds_img_s"]) for row in rows] == [(False, 100.0, [100.0, 100.0]),
                                                                                           (True, 200.0, [200.0, 200.0])]


@pytest.mark.parametrize("script", ["bench.py", "profile_step.py"])
def test_a_missing_dataset_is_one_line_and_exit_status_2(script, tmp_path, monkeypatch):
    import subprocess

    monkeypatch.delenv("VITLAB_DATA", raising=False)
    arguments = ["--data-dir", str(tmp_path / "nowhere")] + (["cnn-small"] if script == "profile_step.py" else [])
    done = subprocess.run([sys.executable, str(Path(bench.__file__).parent / script), *arguments], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    lines = [line for line in done.stderr.splitlines() if line.startswith(f"{script}: error: ")]
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert len(lines) == 1 and "CIFAR-10 not found" in lines[0] and "--data-dir" in lines[0]


def test_a_gpu_step_gets_no_wall_time_split():
    """On a GPU the host's wall time does not measure the device's work: the benchmark leaves the split out."""
    weight = torch.randn(32, 32)
    step = lambda: (torch.randn(64, 32) @ weight).sum()  # noqa: E731
    assert "step_shares" not in bench.step_details(step, 1, torch.device("cuda"))
    assert "step_shares" in bench.step_details(step, 1, torch.device("cpu"))
