"""Sliding-window attention for Hugging Face causal LMs: ``patch_model(model, window, sinks)``."""
__version__ = "0.1.0"

from .config import SWAConfig
from .cache import SWACache, make_cache
from .patch import patch_model, unpatch_model
from .receptive import receptive_field

__all__ = ["SWACache", "SWAConfig", "make_cache", "patch_model", "receptive_field", "unpatch_model",
           "__version__"]
