"""Models and layers: metafunc's exact norm layers (right second-order gradients under ``vmap``), the MLP and
Conv-4 of the papers (:mod:`metafunc.nn.models`), ResNet-18 and ResNet-12."""

from metafunc.nn import models
from metafunc.nn.models import conv4, mlp
from metafunc.nn.norm import BatchNorm, GroupNorm, LayerNorm, convert_norm_layers, find_torch_norm_layers
from metafunc.nn.resnet import resnet18
from metafunc.nn.resnet12 import resnet12

__all__ = ["models", "mlp", "conv4", "resnet18", "resnet12", "BatchNorm", "GroupNorm", "LayerNorm",
           "convert_norm_layers", "find_torch_norm_layers"]
