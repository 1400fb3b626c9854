"""What the draft-length controller learned, kept between generate() calls on one model.

A patched model or pipeline serves call after call with the same draft. Without memory each
call starts blind: a few plain steps to time the target, a short probe, and for a draft that
does not pay here (a dear draft model, text it does not match) a losing probe with its catch-up
on the prompt, on every call. With it, the next call starts where the last one stopped: the
costs and the acceptance calibration known, and a draft that was losing still off for the rest
of its stretch. Output never depends on it (only how far to draft, which verification makes
lossless).

Keyed by the target module (weakly: nothing here keeps a model alive), the draft (a module or a
feature draft, also weakly; prompt lookup has none), and the decoding regime: the path (eager,
graphs, inductor), the batch bucket, the sampling temperature and the largest k.
"""

from __future__ import annotations

import threading
import weakref

import torch

from specdec.draft_length import AdaptiveDraftLength

_BY_TARGET: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def regime(compile_mode: str | None, batch_size: int, temperature: float, k_max: int, lookup: bool) -> tuple:
    """The part of the key that is not an object: what changes costs or acceptance."""
    from specdec.static import batch_bucket   # the batch sizes that share a static runner share costs

    return compile_mode, batch_bucket(batch_size), round(float(temperature), 2), k_max, lookup


def recall(target, draft, key: tuple, fresh: AdaptiveDraftLength) -> AdaptiveDraftLength:
    """The controller to use for this call: what the last call with this target, draft and key
    learned (resumed), else ``fresh``."""
    with _LOCK:
        entry = _BY_TARGET.get(target, {}).get(key + (_draft_id(draft),))
    if entry is None:
        return fresh
    draft_ref, controller = entry
    if draft is not None and draft_ref() is not draft:   # an id reused after the old draft was freed
        return fresh
    return controller.resume()


def remember(target, draft, key: tuple, controller: AdaptiveDraftLength) -> None:
    """Keep what this call's controller learned for the next call with the same key."""
    try:
        draft_ref = weakref.ref(draft) if draft is not None else (lambda: None)
        with _LOCK:
            _BY_TARGET.setdefault(target, {})[key + (_draft_id(draft),)] = (draft_ref, controller)
    except TypeError:  # a target or draft that takes no weak reference: no memory, no harm
        pass


def forget(target=None) -> None:
    """Drop what was learned for ``target`` (every model when None): the next call starts afresh."""
    if target is not None and not isinstance(target, torch.nn.Module):
        raise TypeError(f"forget() takes the target model (a torch.nn.Module) or None, got {type(target).__name__}")
    with _LOCK:
        if target is None:
            _BY_TARGET.clear()
        else:
            _BY_TARGET.pop(target, None)


def _draft_id(draft) -> int | None:
    return None if draft is None else id(draft)
