"""The paper's networks with Random Mask placed by hand, and the study's other source networks."""

from .densenet import DenseNet121, densenet121
from .dropblock import DropBlock2d
from .resnet import ResNet18, ResNet50, resnet18, resnet50
from .senet import SENet18, senet18
from .small import SmallCNN, small_cnn
from .vgg import VGG19, vgg19

__all__ = [
    "DenseNet121",
    "DropBlock2d",
    "ResNet18",
    "ResNet50",
    "SENet18",
    "SmallCNN",
    "VGG19",
    "densenet121",
    "resnet18",
    "resnet50",
    "senet18",
    "small_cnn",
    "vgg19",
]
