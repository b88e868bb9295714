"""Fused masked-convolution kernels, layers and models for Random-Mask CNNs."""

__version__ = "0.1.0"  # first: rmask_kernels.torch_target names it in its error

from . import ops  # noqa: F401  (loads the compiled op library first)
from .backends import available_backends
from .convert import convert_model
from .functional import masked_conv2d
from .masks import check_kept_index, kept_index, random_mask
from .nn import MaskedConv2d, MaskedConvBN2d, RandomMask
from . import models

__all__ = [
    "available_backends",
    "check_kept_index",
    "convert_model",
    "kept_index",
    "masked_conv2d",
    "models",
    "random_mask",
    "MaskedConv2d",
    "MaskedConvBN2d",
    "RandomMask",
]

