"""`vitlab export RUN_DIR --onnx FILE`: a trained model as ONNX, checked against PyTorch.

The exported graph takes `images`: float32 (B, 3, 32, 32), RGB scaled to [0, 1] (what torchvision's
ToTensor gives), normalises them with the CIFAR-10 statistics inside the graph, and returns `logits`
(B, 10); the batch size is dynamic and the class names are in the file's metadata (`classes`).
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from vitlab.errors import VitlabError
from vitlab.io import atomic_write
from vitlab.models import VitlabModel


class NormalizedModel(nn.Module):
    """Images in [0, 1] → the model's logits, with the dataset normalisation as part of the graph."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(model.input_spec.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(model.input_spec.std).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) in [0, 1] → (B, classes)
        return self.model((images - self.mean) / self.std)


@dataclass
class ExportCheck:
    """How the ONNX file's logits agree with PyTorch's (fp32, CPU) on a batch of images."""

    images: int
    max_abs_logit_difference: float
    top1_agreement: float  # share of images with the same predicted class


def export_onnx(model: VitlabModel, path: str | Path, opset: int = 18) -> Path:
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        raise VitlabError("ONNX export needs the onnx and onnxscript packages; pip install 'vitlab[export]'") from None
    path = Path(path)
    if path.suffix != ".onnx":
        raise VitlabError(f"--onnx {path} should end in .onnx")
    wrapper = NormalizedModel(model.float().cpu().eval()).eval()
    size = getattr(model.config, "image_size", 32)
    example = torch.rand(2, 3, size, size)
    batch = torch.export.Dim("batch", min=1, max=65536)

    def write(tmp: str) -> None:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(wrapper, (example,), input_names=["images"], output_names=["logits"],
                                        dynamic_shapes=({0: batch},), dynamo=True, opset_version=opset, verbose=False)
        program.model.metadata_props["classes"] = json.dumps(list(model.input_spec.classes))
        program.model.metadata_props["input"] = f"float32 (B, 3, {size}, {size}) RGB in [0, 1]; normalised inside the graph"
        program.model.metadata_props["vitlab_model"] = json.dumps({"model": model.name, "config": vars(model.config)})
        program.save(tmp)

    try:
        atomic_write(path, write)
    except OSError as error:
        raise VitlabError(f"cannot write {path} ({error.strerror or error}); choose a writable place") from None
    return path


def check_onnx(path: str | Path, model: VitlabModel, images: torch.Tensor) -> ExportCheck:
    """Run the ONNX file with onnxruntime on uint8 `images` (N, 3, 32, 32) and compare with PyTorch."""
    try:
        import onnxruntime
    except ImportError:
        raise VitlabError("checking an ONNX file needs onnxruntime; pip install 'vitlab[export]'") from None
    inputs = images.float() / 255.0  # (N, 3, 32, 32) in [0, 1]
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    onnx_logits = torch.from_numpy(session.run(["logits"], {"images": inputs.numpy()})[0])
    with torch.inference_mode():
        torch_logits = NormalizedModel(model.float().cpu().eval()).eval()(inputs)
    return ExportCheck(images=len(images), max_abs_logit_difference=float((onnx_logits - torch_logits).abs().max()),
                       top1_agreement=float((onnx_logits.argmax(1) == torch_logits.argmax(1)).double().mean()))
