"""The model zoo: ``create_model(name, ...)`` and the ``Normalize`` layer."""

from robustlab.models import resnet, simple  # noqa: F401  (register the models)
from robustlab.models.layers import Normalize
from robustlab.models.registry import MODELS, create_model

__all__ = ["MODELS", "Normalize", "create_model"]
