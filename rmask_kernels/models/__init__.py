"""The paper's networks with Random Mask placed by hand."""

from .resnet import ResNet18, resnet18

__all__ = ["ResNet18", "resnet18"]
