"""When a prefix-cache hit is worth using, learned per model and path from the prefills' own timings.

A hit skips the prefill of its cached tokens, but it pays for the lookup and the load and still
runs the suffix as a forward of its own. Where forwards are launch bound (a small model on a GPU
without ``compile=True``), a forward of 16 tokens costs about what one of 2,000 does, so the hit
can cost more than the miss it replaces. generate() times every prefill up to its first token
(which it reads back anyway) and hands the time here; per model and path (compile mode, KV
quantization, batch size, whether a draft's K/V is cached) two lines are fitted to recent timings:

    miss(P)   = a + b * P          a prefill of P prompt tokens
    hit(h, s) = c + d * h + b * s  h tokens loaded from the cache, then s suffix tokens run

where the suffix's tokens are priced like a prefill's (b). A hit is predicted faster than the
miss it replaces, prefilling h + s tokens, when c + d * h < a + b * h: the suffix drops out, and
the rule is a threshold on h, the ``min_hit_tokens`` this module returns: (c - a) / (b - d)
where d < b, no hit at all where d >= b.

- Lines are Theil-Sen fits (median of the pairwise slopes), so a few slow calls (a first call
  on a device, a garbage collection) do not move them; calls that captured a CUDA graph are not
  recorded at all. With one length seen the slope is taken as 0.
- Until both kinds have been timed, the device default applies (``PrefixCache.hit_threshold``).
- After ``PROBE_EVERY`` prefills without a hit, one call uses the default threshold again, so
  that a hit refused on old timings is timed afresh: at most one call in ``PROBE_EVERY`` takes
  a hit that the lines predict slower.
- It applies to models on an accelerator. On a CPU the prefill is compute bound and grows with
  its tokens from the first block: every hit is used, as before.
- ``min_hit_tokens`` given to the ``PrefixCache`` always wins; so does a cache of another kind.

Only which prompt tokens are prefilled depends on it, never the output: a hit and a prefill give
the same tokens (tests check it in fp32).
"""

from __future__ import annotations

import itertools
import math
import statistics
import threading
import weakref
from collections import deque

import torch

WINDOW = 12          # recent timings per kind (miss, hit) and path
PROBE_EVERY = 16     # prefills without a hit before one call uses the default threshold again
NEVER = 1 << 62      # a threshold no prefix reaches

_BY_MODEL: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # model -> {path: HitCosts}
_LOCK = threading.Lock()


def fit_line(points: list[tuple[float, float]]) -> tuple[float, float]:
    """(intercept, slope >= 0) of a Theil-Sen line through (x, y) points; slope 0 when all x are equal."""
    slopes = [(y2 - y1) / (x2 - x1) for (x1, y1), (x2, y2) in itertools.combinations(points, 2) if x2 != x1]
    slope = max(statistics.median(slopes), 0.0) if slopes else 0.0
    return statistics.median(y - slope * x for x, y in points), slope


class HitCosts:
    """Recent prefill timings of one model on one path, and the hit threshold they imply."""

    def __init__(self) -> None:
        self.misses: deque[tuple[int, float]] = deque(maxlen=WINDOW)            # (tokens run, seconds)
        self.hits: deque[tuple[int, int, float]] = deque(maxlen=WINDOW)         # (loaded, run, seconds)
        self.since_hit = 0                     # prefills since the last hit
        self.learned: int | None = None        # threshold of the current lines (None: not both timed)

    def observe(self, loaded: int, run: int, seconds: float) -> None:
        """Record one prefill: ``loaded`` tokens from the cache (0: a miss), ``run`` tokens forwarded."""
        if loaded:
            self.hits.append((loaded, run, seconds))
            self.since_hit = 0
        else:
            self.misses.append((run, seconds))
            self.since_hit += 1
        self.learned = self._fit() if self.hits and self.misses else None

    def threshold(self, default: int) -> int:
        """Fewest cached tokens a hit must cover to be used now."""
        if self.learned is None or self.since_hit >= PROBE_EVERY:
            return default
        return self.learned

    def _fit(self) -> int:
        a, b = fit_line(list(self.misses))
        c, d = fit_line([(h, t - b * s) for h, s, t in self.hits])
        if d >= b:                          # no crossing ahead: the lines at h = 0 decide
            return NEVER if c >= a else 0
        return max(0, math.ceil((c - a) / (b - d)))


def path(compile_mode: str | None, kv_quant: str | None, batch_size: int, draft_cached: bool) -> tuple:
    """What a prefill's cost depends on besides the model: ``compile_mode`` (None, "graphs",
    "inductor"), ``kv_quant``, the batch size, whether a draft's K/V is cached too."""
    return compile_mode, kv_quant, batch_size, draft_cached


def applies(model: torch.nn.Module) -> bool:
    """Whether hits are gated by timings for this model: on an accelerator, not on a CPU."""
    param = next(model.parameters(), None)
    return param is not None and param.device.type not in ("cpu", "meta")


def costs(model: torch.nn.Module, path: tuple) -> HitCosts:
    """The timings kept for ``model`` on ``path`` (made on first use)."""
    with _LOCK:
        return _BY_MODEL.setdefault(model, {}).setdefault(path, HitCosts())


def threshold(model: torch.nn.Module, path: tuple, prefix_cache) -> int | None:
    """The ``min_tokens`` a generate() call on ``path`` looks hits up with (None: the cache decides)."""
    if not hasattr(prefix_cache, "hit_threshold"):
        return None
    default = prefix_cache.hit_threshold(model)
    if getattr(prefix_cache, "min_hit_tokens", None) is not None or not applies(model):
        return default
    with _LOCK:
        entry = _BY_MODEL.get(model, {}).get(path)
        return default if entry is None else entry.threshold(default)


def observe(model: torch.nn.Module, path: tuple, loaded: int, run: int, seconds: float) -> None:
    """Record a prefill of ``model`` on ``path`` timed to its first token (see ``HitCosts.observe``)."""
    if applies(model):
        entry = costs(model, path)
        with _LOCK:
            entry.observe(loaded, run, seconds)


def forget(model: torch.nn.Module | None = None) -> None:
    """Drop the timings of ``model`` (of every model when None)."""
    with _LOCK:
        if model is None:
            _BY_MODEL.clear()
        else:
            _BY_MODEL.pop(model, None)
