"""Segmentation networks: SegNet, PSPNet (ResNet-18/50/101) and ICNet, each with a width multiplier."""

from workbench.models.segmentation.icnet import ICNet, icnet
from workbench.models.segmentation.pspnet import PSPNet, pspnet_resnet18, pspnet_resnet50, pspnet_resnet101
from workbench.models.segmentation.segnet import SegNet, segnet

SEGMENTATION_MODELS = {
    "segnet": segnet,
    "pspnet_resnet18": pspnet_resnet18,
    "pspnet_resnet50": pspnet_resnet50,
    "pspnet_resnet101": pspnet_resnet101,
    "icnet": icnet,
}

__all__ = ["ICNet", "PSPNet", "SEGMENTATION_MODELS", "SegNet", "icnet", "pspnet_resnet18", "pspnet_resnet50",
           "pspnet_resnet101", "segnet"]
