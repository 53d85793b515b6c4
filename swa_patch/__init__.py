"""Sliding-window attention for Hugging Face causal LMs: ``patch_model(model, window, sinks)``."""
__version__ = "0.1.0"

from .config import SWAConfig
from .patch import patch_model, unpatch_model
from .receptive import receptive_field

__all__ = ["SWAConfig", "patch_model", "unpatch_model", "receptive_field", "__version__"]
