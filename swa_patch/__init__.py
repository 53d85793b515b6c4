"""Sliding-window attention for Hugging Face causal LMs: ``patch_model(model, window, sinks)``."""
__version__ = "0.1.0"

from .config import SWAConfig
from .cache import SWACache, make_cache
from .patch import patch_model, unpatch_model

__all__ = ["SWACache", "SWAConfig", "make_cache", "patch_model", "unpatch_model", "__version__"]
