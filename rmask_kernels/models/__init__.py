"""The paper's networks with Random Mask placed by hand."""

from .resnet import ResNet18, resnet18
from .small import SmallCNN, small_cnn
from .vgg import VGG19, vgg19

__all__ = ["ResNet18", "SmallCNN", "VGG19", "resnet18", "small_cnn", "vgg19"]
