"""vitlab: train, evaluate and explain Vision Transformers on small image datasets."""

from . import explain
from .checkpoint import load_checkpoint
from .config import TrainConfig
from .errors import CheckpointError, ConfigError, DataError, VitlabError
from .model import Kernels, ViT, ViTConfig
from .pretrained import load_pretrained

__all__ = ["explain", "ViT", "ViTConfig", "Kernels", "TrainConfig", "load_checkpoint", "load_pretrained", "VitlabError",
           "ConfigError", "DataError", "CheckpointError"]
__version__ = "0.2.0"
