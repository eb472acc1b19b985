"""Built-in CIFAR-style models (WRN, ResNet, PyramidNet) and the name registry that builds them."""

from robustkd.models.base import DistillLayer
from robustkd.models.registry import build_model, count_parameters, list_models, register_model

__all__ = ["DistillLayer", "build_model", "count_parameters", "list_models", "register_model"]
