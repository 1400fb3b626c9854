"""HF glue: model loaders, and patch/unpatch of models and pipelines (drop-in specdec)."""

from .hf import PatchSettings, SpecdecFallbackWarning, is_patched, last_stats, patch, patched, unpatch
from .models import load_default, load_model

__all__ = ["PatchSettings", "SpecdecFallbackWarning", "is_patched", "last_stats", "load_default", "load_model",
           "patch", "patched", "unpatch"]
