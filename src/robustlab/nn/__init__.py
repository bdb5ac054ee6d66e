"""Model surgery and building blocks that work on any ``nn.Module``."""

from robustlab.nn.activations import ACTIVATIONS, make_activation

__all__ = ["ACTIVATIONS", "make_activation"]
