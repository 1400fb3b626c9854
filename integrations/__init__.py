"""HF glue: model loaders, and (soon) patch/unpatch of models and pipelines."""

from integrations.models import load_default, load_model

__all__ = ["load_default", "load_model"]
