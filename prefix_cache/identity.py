"""Model identities: the part of every block key that keeps two models' K/V apart.

Two models of one shape (a base model and its fine-tune, a model before and after
``quant.quantize()``) give K/V of equal shapes for equal tokens, so the tokens alone must not
find a block: its key also holds the identity of the model that computed it.

- By default the identity is a number given to the module object the first time it is seen and
  never given to another (not ``id()``, which comes back after garbage collection), joined with
  a signature of its weights: where every parameter and buffer lives, its dtype and how often it
  was written in place. Moving the model (``.to(dtype)``), quantizing it or loading other weights
  into it (``load_state_dict``) changes the identity, so its old blocks are never read again.
- ``model_key`` (a string the caller chooses, e.g. a checkpoint name and revision) replaces the
  per-object number and the weights' addresses, so a cache that outlives the model object hits
  again for a new object loaded from the same weights. The parameters' names, shapes and dtypes
  still join the key (quantizing or casting misses); that the weights behind a key are the ones
  it names is the caller's promise.
"""

from __future__ import annotations

import itertools
import threading
import weakref

import numpy as np
import torch
import xxhash

_LOCK = threading.Lock()
_NEXT = itertools.count(1)
# one number per module object, made on first use; weak keys: the entry dies with the module
_OBJECT_IDS: "weakref.WeakKeyDictionary[torch.nn.Module, int]" = weakref.WeakKeyDictionary()


def object_number(model: torch.nn.Module) -> int:
    """A number for this module object, never given to another object in this process."""
    with _LOCK:
        number = _OBJECT_IDS.get(model)
        if number is None:
            number = _OBJECT_IDS[model] = next(_NEXT)
        return number


# per module object: its submodules (name, module, that module's children when listed), so that
# a signature walks flat lists instead of nn.Module's recursive generators (a few times faster).
# The model itself is left out of its entry (a weak key whose value held it would never die).
_DTYPES: dict[torch.dtype, int] = {}   # a small number per dtype seen (within this process)
_TREES: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _submodules(model: torch.nn.Module) -> list:
    """[(name, module, children tuple)] of the model and every submodule; relisted when any module's
    children changed (a layer swapped by ``quantize()``, a module added or removed)."""
    entry = _TREES.get(model)
    if entry is not None:
        tree = [("", model, entry[0])] + entry[1]
        if not any(tuple(m._modules.values()) != kids for _, m, kids in tree):
            return tree
    tree = [(name, m, tuple(m._modules.values())) for name, m in model.named_modules(remove_duplicate=False)]
    with _LOCK:
        _TREES[model] = (tree[0][2], tree[1:])
    return tree


def _tensors(model: torch.nn.Module):
    """Per module: its name and its parameters and buffers, read fresh (a replaced tensor shows)."""
    for prefix, m, _ in _submodules(model):
        yield prefix, m._parameters, m._buffers


def module_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    """Every parameter and buffer of every submodule (a tied one once per module holding it), read
    fresh, from the cached module list (``parameters()`` and ``buffers()`` recurse through the modules
    on every call)."""
    out: list[torch.Tensor] = []
    for _, m, _ in _submodules(model):
        params, buffers = m._parameters, m._buffers
        if params:
            out += [t for t in params.values() if t is not None]
        if buffers:
            out += [t for t in buffers.values() if t is not None]
    return out


def _version(t: torch.Tensor) -> int:
    try:
        return t._version              # bumped by every in-place write (load_state_dict's copy_)
    except RuntimeError:               # inference tensors keep no version counter
        return -1


def weights_signature(model: torch.nn.Module) -> str:
    """A hash of where each parameter and buffer lives, its dtype and in-place write count."""
    tensors = module_tensors(model)
    try:
        versions = [t._version for t in tensors]      # bumped by every in-place write (load_state_dict's copy_)
    except RuntimeError:                              # inference tensors keep no version counter
        versions = [_version(t) for t in tensors]
    dtypes = _DTYPES
    values = [t.data_ptr() for t in tensors] + versions + [dtypes.setdefault(t.dtype, len(dtypes)) for t in tensors]
    return xxhash.xxh3_64_hexdigest(np.asarray(values, dtype=np.int64).tobytes())


def structure_signature(model: torch.nn.Module) -> str:
    """A hash of each parameter's and buffer's name, shape and dtype (not where it lives)."""
    h = xxhash.xxh3_64()
    for prefix, params, buffers in _tensors(model):
        for name, t in itertools.chain(params.items(), buffers.items()):
            if t is not None:
                h.update(f"{prefix}.{name}:{tuple(t.shape)}:{t.dtype};".encode())
    return h.hexdigest()


def model_identity(model: torch.nn.Module, model_key: str | None = None) -> str:
    """The identity string a prefix cache joins to the keys of ``model``'s blocks (module docstring)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if model_key is None:
        return f"obj{object_number(model)}-{weights_signature(model)}"
    return f"key={check_model_key(model_key)}-{structure_signature(model)}"


def check_model_key(model_key: object) -> str:
    """``model_key`` if it is a non-empty str, else TypeError/ValueError saying what to pass."""
    if not isinstance(model_key, str):
        raise TypeError(f"model_key must be a str naming the weights (e.g. 'org/model@rev'), "
                        f"got {type(model_key).__name__}")
    if not model_key:
        raise ValueError("model_key must be a non-empty str naming the weights, e.g. 'org/model@rev'")
    return model_key
