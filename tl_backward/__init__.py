"""tl_backward: read the backward pass of transformer LMs through TransformerLens hook points."""

from .core import metrics
from .core.capture import GradientCache, capture
from .core.loading import list_models, load_model

__version__ = "0.1.0"

__all__ = ["GradientCache", "capture", "list_models", "load_model", "metrics"]
