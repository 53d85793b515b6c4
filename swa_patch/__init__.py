"""Sliding-window attention for Hugging Face causal LMs: ``patch_model(model, window, sinks)``."""
__version__ = "0.1.0"

from .checkpoint import from_pretrained, save_pretrained
from .config import SWAConfig
from .patch import patch_model, unpatch_model

__all__ = ["SWAConfig", "patch_model", "unpatch_model", "from_pretrained", "save_pretrained",
           "__version__"]
