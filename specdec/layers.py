"""Where a Hugging Face causal LM keeps its decoder layers, and shallow copies of its module tree.

Used by the early-exit draft (:mod:`specdec.drafters`), the distilled drafts
(:mod:`specdec.distill.model`), the feature draft and the last-layer hook of
:mod:`specdec.adapter`. Depends on nothing of this project, so any of them may import it.
"""

from __future__ import annotations

import copy

import torch


def find_layer_list(model: torch.nn.Module) -> tuple[list[str], torch.nn.ModuleList]:
    """The decoder's layer list, and its dotted path split into names: the ModuleList with
    ``num_hidden_layers`` entries."""
    n = model.config.get_text_config().num_hidden_layers
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return name.split("."), module
    raise ValueError(f"cannot find the decoder layer list of {type(model).__name__}; "
                     "pass draft_model= or use prompt_lookup_num_tokens= instead")


def shallow_copy(module: torch.nn.Module, config) -> torch.nn.Module:
    """A copy of ``module`` that shares its parameters and children (its own child dict, so a
    child can be swapped without touching the original), with ``config`` as its config."""
    clone = copy.copy(module)
    clone.__dict__["_modules"] = dict(module._modules)
    # accelerate (device_map) hooks bind `forward` to the ORIGINAL instance, which would run
    # all of its layers: the clone uses its class's forward; the layers keep their own hooks
    for name in ("forward", "_old_forward", "_hf_hook"):
        clone.__dict__.pop(name, None)
    if hasattr(module, "config"):
        clone.config = config
    return clone


def truncate_config(config, num_layers: int) -> None:
    """Make ``config`` (in place) describe only the first ``num_layers`` decoder layers."""
    text = config.get_text_config()
    text.num_hidden_layers = num_layers
    if getattr(text, "layer_types", None):
        text.layer_types = text.layer_types[:num_layers]
