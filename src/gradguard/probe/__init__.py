"""What knows PyTorch: turns parameters, gradients and activations into Trace rows."""

from .activations import ActivationProbe
from .grads import GradProbe
from .layers import LayerIndex, find_layers

__all__ = ["ActivationProbe", "GradProbe", "LayerIndex", "find_layers"]
