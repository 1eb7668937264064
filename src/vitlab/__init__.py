"""vitlab: train, compare and look inside Vision Transformers and CNNs on CIFAR-10."""

__version__ = "0.1.0"

from vitlab.config import DataConfig, RunConfig, TrainConfig  # noqa: E402
from vitlab.data import load_cifar10  # noqa: E402
from vitlab.errors import VitlabError  # noqa: E402
from vitlab.models import CNN, MLP, SmallCNN, VisionTransformer, ViTConfig, build_model  # noqa: E402
from vitlab.models.base import VitlabModel  # noqa: E402
from vitlab.train.trainer import Runner  # noqa: E402

load_model = VitlabModel.load

__all__ = [
    "CNN", "MLP", "DataConfig", "RunConfig", "Runner", "SmallCNN", "TrainConfig", "ViTConfig",
    "VisionTransformer", "VitlabError", "VitlabModel", "build_model", "load_cifar10", "load_model",
]
