"""Sliding-window attention for Hugging Face causal LMs: ``patch_model(model, window, sinks)``."""
__version__ = "0.1.0"

from .calibration import Plan, calibrate
from .checkpoint import from_pretrained, save_pretrained
from .config import SWAConfig
from .export import export_for_serving
from .cache import SWACache
from .generation import make_cache
from .patch import original_attention, patch_model, unpatch_model
from .receptive import receptive_field

__all__ = ["Plan", "SWACache", "SWAConfig", "calibrate", "export_for_serving", "from_pretrained", "make_cache", "original_attention",
           "patch_model", "receptive_field", "save_pretrained", "unpatch_model", "__version__"]
