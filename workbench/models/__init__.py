"""Models: the CIFAR ResNet family (with BN/IEBN/no norm and none/SE/DIA attention) and the
segmentation networks, built by name through ``build_model``."""

from workbench.models import cifar_resnet
from workbench.models.cifar_resnet import ATTENTIONS, NORMS, CifarResNet
from workbench.models.registry import build_model, list_models, register_model
from workbench.models.segmentation import SEGMENTATION_MODELS

for _name, _builder in SEGMENTATION_MODELS.items():
    register_model(_name)(_builder)

__all__ = ["ATTENTIONS", "NORMS", "CifarResNet", "build_model", "cifar_resnet", "list_models", "register_model"]
