"""Build a distillable draft from a target: the target's architecture with fewer decoder layers.

The draft is an instance of the target's own class whose config says ``num_hidden_layers=N``,
so it has the target's tokenizer, and ``save_pretrained`` / ``AutoModelForCausalLM`` just work.

- its N decoder layers start as copies of N target layers (see :func:`pick_layers`);
- norm modules outside the layer list (the final norm) are copies too; these are the
  draft's *own* tensors, the ones training updates and the shipped file stores;
- everything else (token embeddings, LM head, learned position tables, rotary tables) is
  the target's own storage, shared (no memory) and frozen.

Like :func:`specdec.early_exit_model`, the module tree is copied shallowly along the path
to each replaced module, so the target itself is never modified.
"""

from __future__ import annotations

import copy
import itertools

import torch
from torch import nn

from specdec.layers import find_layer_list, shallow_copy, truncate_config

LAYER_CHOICES = ("spread", "first")


def pick_layers(num_target_layers: int, num_layers: int, how: str = "spread") -> list[int]:
    """Which target layers initialise the draft's layers.

    ``"first"``: layers 0..N-1 (the early-exit self-draft). ``"spread"``: evenly spaced from
    the first to the last layer (e.g. 0, 10, 19, 29 of 30): the last layer already writes
    what the final norm and head read, so the untrained draft starts closer to the target.
    """
    if not 1 <= num_layers < num_target_layers:
        raise ValueError(f"a draft needs 1..{num_target_layers - 1} layers for a {num_target_layers}-layer "
                         f"target, got {num_layers}")
    if how == "first" or num_layers == 1:
        return list(range(num_layers))
    if how == "spread":
        step = (num_target_layers - 1) / (num_layers - 1)
        return [round(i * step) for i in range(num_layers)]
    raise ValueError(f"layer choice must be one of {LAYER_CHOICES}, got {how!r}")


def build_draft(target: nn.Module, layers: list[int], dtype: torch.dtype | None = None) -> nn.Module:
    """A draft whose decoder layers are copies of ``target``'s ``layers`` (in that order).

    Args:
        target: an HF decoder-only causal LM.
        layers: target layer indices, one per draft layer.
        dtype: dtype of the draft's own tensors (default: the target's). Train in float32.

    Returns:
        The draft in eval mode. Its own parameters (see :func:`own_parameters`) require grad;
        the shared ones are the target's tensors and are left as they are.
    """
    path, target_layers = find_layer_list(target)
    config = copy.deepcopy(target.config)
    text = config.get_text_config()
    layer_types = getattr(text, "layer_types", None)
    truncate_config(config, len(layers))
    if layer_types:
        text.layer_types = [layer_types[i] for i in layers]
    draft = shallow_copy(target, config)
    draft.generation_config = copy.deepcopy(target.generation_config)
    new_layers = nn.ModuleList(_copy_layer(target_layers[i], j, dtype) for j, i in enumerate(layers))
    _replace(draft, target, path, new_layers, config)
    for name in _norm_modules(target, ".".join(path)):
        _replace(draft, target, name.split("."), _copy(target.get_submodule(name), dtype), config)
    for p in own_parameters(draft, target):
        p.requires_grad_(True)
    return draft.eval()


def grow_layers(layers: list[int], num_layers: int, num_target_layers: int) -> list[int]:
    """``layers`` (a draft's target layers, ascending) plus new ones up to ``num_layers``: each new
    one at the middle of the widest gap left between neighbours (e.g. [0, 10, 19, 29] -> 6 layers:
    [0, 5, 10, 19, 24, 29])."""
    if num_layers >= num_target_layers or sorted(set(layers)) != list(layers):
        raise ValueError(f"cannot grow target layers {layers} to {num_layers} of {num_target_layers}")
    out = list(layers)
    while len(out) < num_layers:
        bounds = [-1] + out + [num_target_layers]
        gap, i = max((b - a, i) for i, (a, b) in enumerate(zip(bounds, bounds[1:])))
        if gap < 2:
            raise ValueError(f"no target layer left between {layers} to grow to {num_layers}")
        out.insert(i, (bounds[i] + bounds[i + 1] + 1) // 2)
    return out


def grow(draft: nn.Module, target: nn.Module, layers: list[int], num_layers: int) -> tuple[nn.Module, list[int]]:
    """A deeper draft that computes exactly what ``draft`` does, to train on (more capacity).

    ``draft``'s layers (copies of target ``layers``) keep their trained weights; new layers,
    copies of the target layers :func:`grow_layers` picks, go between them with their residual
    branches' output projections zeroed (each adds nothing until training moves them, so the
    grown draft starts at the trained draft's acceptance, not from scratch).

    Returns (grown draft in ``draft``'s dtype, its target layers).
    """
    n_target = target.config.get_text_config().num_hidden_layers
    new_layers = grow_layers(layers, num_layers, n_target)
    dtype = own_parameters(draft, target)[0].dtype
    grown = build_draft(target, new_layers, dtype=dtype)
    prefix = ".".join(find_layer_list(target)[0]) + "."
    moved = {prefix + f"{i}.": prefix + f"{new_layers.index(t)}." for i, t in enumerate(layers)}
    state = {}
    for key, value in own_state_dict(draft, target).items():
        old = next((o for o in moved if key.startswith(o)), None)
        state[moved[old] + key[len(old):] if old else key] = value
    own = own_state_dict(grown, target)
    _, grown_layers = find_layer_list(grown)
    with torch.no_grad():
        for key, value in state.items():
            own[key].copy_(value)
        for j, t in enumerate(new_layers):
            if t not in layers:
                for linear in residual_writers(grown_layers[j], grown.config.get_text_config().hidden_size):
                    linear.weight.zero_()
                    if linear.bias is not None:
                        linear.bias.zero_()
    return grown, new_layers


def residual_writers(layer: nn.Module, hidden_size: int) -> list[nn.Linear]:
    """The linears that write a decoder layer's residual branches: in each of its sub-blocks
    (attention, MLP), the last linear whose output is the hidden size (``o_proj``, ``down_proj``).

    Raises:
        ValueError: the layer has no such linears (an architecture this cannot grow).
    """
    out = []
    for block in layer.children():
        linears = [m for m in block.modules() if isinstance(m, nn.Linear) and m.out_features == hidden_size]
        out += linears[-1:]
    if len(out) < 2:
        raise ValueError(f"cannot find the attention and MLP output projections of {type(layer).__name__}: "
                         "growing a draft needs them (train a deeper draft from the start instead: --layers N)")
    return out


def own_parameters(draft: nn.Module, target: nn.Module) -> list[nn.Parameter]:
    """The draft's parameters that are not the target's (its layers and norms), in a fixed order."""
    shared = {id(p) for p in target.parameters()}
    return [p for p in draft.parameters() if id(p) not in shared]


def own_state_dict(draft: nn.Module, target: nn.Module) -> dict[str, torch.Tensor]:
    """``draft.state_dict()`` restricted to the draft's own tensors (what a shipped file stores)."""
    # the target's live tensors: its state_dict() may hand out copies (joined projections, compile=True)
    shared = {t.data_ptr() for t in itertools.chain(target.parameters(), target.buffers())}
    return {k: v for k, v in draft.state_dict().items() if v.data_ptr() not in shared}


def standalone(draft: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """A deep copy that owns every tensor (shared ones included), e.g. to ``save_pretrained``."""
    out = copy.deepcopy(draft)
    for p in out.parameters():
        p.requires_grad_(False)
    return out.to(dtype) if dtype is not None else out


def _copy_layer(layer: nn.Module, index: int, dtype) -> nn.Module:
    out = _copy(layer, dtype)
    for module in out.modules():  # the KV cache is indexed by layer_idx: renumber
        if hasattr(module, "layer_idx"):
            module.layer_idx = index
    return out


def _copy(module: nn.Module, dtype) -> nn.Module:
    out = copy.deepcopy(module)
    for name in ("forward", "_old_forward", "_hf_hook"):  # accelerate hooks bound to the original
        out.__dict__.pop(name, None)
    return out.to(dtype) if dtype is not None else out


def _norm_modules(target: nn.Module, layer_path: str) -> list[str]:
    """Names of modules outside the layer list whose own parameters are all 1-D (norms)."""
    names = []
    for name, module in target.named_modules():
        if name == layer_path or name.startswith(layer_path + "."):
            continue
        params = list(module.parameters(recurse=False))
        if params and all(p.dim() == 1 for p in params):
            names.append(name)
    return names


def _replace(draft: nn.Module, target: nn.Module, path: list[str], new: nn.Module, config) -> None:
    """Put ``new`` at ``path`` in ``draft``, shallow-copying ancestors still shared with ``target``."""
    parent, original = draft, target
    for name in path[:-1]:
        child, original = parent._modules[name], original._modules[name]
        if child is original:
            child = shallow_copy(child, config)
            parent._modules[name] = child
        parent = child
    parent._modules[path[-1]] = new
