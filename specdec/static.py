"""The fast path: a static KV cache and CUDA graphs for decode-sized forwards.

An eager HF forward of a small model is launch bound (tens of ms for a step the GPU
does in well under one), and speculative decoding multiplies what a step costs. So:

- ``StaticRunner`` has ``ModelRunner``'s interface but runs over an HF ``StaticCache``
  preallocated to ``max_len`` slots for a fixed batch size. Its cache object for the
  loop, ``StaticSlots``, is just that cache plus an int ``length``: cropping lowers
  ``length`` and the rejected slots are overwritten by the next step (as in gpt-fast),
  never copied. Keys past ``length`` are masked, so stale KV is harmless.
- Each forward writes its n tokens at slots ``length .. length+n-1`` (our own index,
  not the cache's internal counter, which cannot go backwards) under a ready 4D mask
  (B, 1, n, max_len) built from the loop's key mask: HF passes a 4D mask through as is.
- On CUDA, every decode-sized n (<= ``graph_max_tokens``) gets one ``CUDAGraph``,
  captured on first use into a memory pool shared by the runner's graphs; a replay
  copies the inputs into static buffers and returns a clone of the static logits.
  Larger n (the prefill) runs eagerly through the same cache. Without CUDA the same
  runner runs eagerly (what CI tests).
- Runners are kept per (model, role, batch, dtype, device, max_len bucket, fuse) while the
  model lives, so a second ``generate()`` captures nothing. A runner's cache and graph buffers
  serve one call at a time: ``static_runner`` checks one out for the caller alone and
  ``give_back`` returns it; concurrent calls (threads) get copies, at most
  ``MAX_COPIES`` per key, then wait for one to come back.
- ``fuse=True`` (``compile="inductor"``) runs the forward through ``torch.compile``
  (Inductor, no CUDA graphs of its own) before our capture: a graph replay still pays a
  few microseconds per kernel, and an eager Llama layer is ~40 kernels (norms, rotary,
  casts); fused, it is ~10, which matters most for large models where the step should
  cost only the weight reads. Costs a compile (tens of seconds) on a runner's first use.
- Sibling projections (q/k/v, gate/up) are joined into one weight each
  (``specdec.fused_linear``): one matrix-vector product instead of three or two.

Where the static path does not fit (sliding-window or other non-plain cache layers, an
attention implementation that cannot take a 4D mask, encoder-decoders), ``static_runner``
warns once and returns the eager ``ModelRunner``; a failed graph capture warns once and
leaves that runner eager over its static cache.
"""

from __future__ import annotations

import gc
import threading
import types
import warnings
import weakref
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from specdec.adapter import ModelRunner, accepts, cache_keyword, hook_last_layer
from specdec.quant.kv import QTensor, dequantize_token_groups, quantize_token_groups
from specdec.attention import PACKED_GQA, attention_implementation
from specdec.device_lock import DEVICE
from specdec.fused_linear import fused_projections, join_projections
from specdec.prefix_cache.identity import module_tensors

MAX_COPIES = 4                    # runners per key (concurrent calls of one shape); more calls wait
captures = 0                      # CUDA graphs captured so far in this process
_compiled = 0                     # fused (torch.compile) forwards made so far
# (model id, role, batch, dtype, device, fuse, kv_bits, max_len bucket, copy) -> runner
_RUNNERS: dict[tuple, "StaticRunner"] = {}
_BUSY: "weakref.WeakSet[StaticRunner]" = weakref.WeakSet()   # checked out by a running call
_WARNED: set[str] = set()
# guards _RUNNERS' checkouts, _BUSY, _WARNED and the counters; reentrant: a warning or a runner
# built under it may land back here
_LOCK = threading.RLock()
_RETURNED = threading.Condition(_LOCK)   # notified when a runner is given back


def _warn_once(message: str) -> None:
    with _LOCK:
        if message in _WARNED:
            return
        _WARNED.add(message)
    warnings.warn(message, RuntimeWarning, stacklevel=3)


class StaticSlots:
    """The loop's view of a static cache: the HF StaticCache's first ``length`` slots.

    ``rows`` maps the loop's active rows to the cache's fixed batch rows: a finished row
    is dropped from the map, and its cache row idles (fed a dummy token, output unused)
    until the call ends, so graphs keep their one batch size.
    """

    def __init__(self, runner: "StaticRunner"):
        self.runner = runner
        self.length = 0
        self.rows: torch.Tensor | None = None   # None: every cache row is active, in order

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def crop(self, max_length: int) -> None:
        """HF semantics: negative = drop that many slots, else keep the first ``max_length``."""
        new = self.length + max_length if max_length < 0 else min(max_length, self.length)
        self.length = max(0, new)

    def batch_select_indices(self, keep: torch.Tensor) -> None:
        """Keep the active rows at indices ``keep`` (HF's name for dropping finished rows)."""
        current = self.active_rows()
        self.rows = current[keep.to(current.device)]

    def active_rows(self) -> torch.Tensor:
        """(b,) cache rows of the loop's active rows."""
        if self.rows is None:
            return torch.arange(self.runner.batch_size, device=self.runner.device)
        return self.rows

    def kv(self, row: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (key, value) of active row ``row``'s first ``length`` slots, each
        (1, heads, length, head_dim): views of the static storage (copy before the next forward)."""
        if self.runner.kv_bits is not None:
            raise ValueError("a quantized static cache holds codes, not K/V to store: a prefix cache stores a "
                             "quantized run's prompt at prefill (StaticRunner.prefill_after)")
        r = int(self.active_rows()[row])
        return [(layer.keys[r:r + 1, :, :self.length], layer.values[r:r + 1, :, :self.length])
                for layer in self.runner._hf_cache.layers]

    def load(self, kv_layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Start from a cached prefix: per layer (key, value) (B, heads, n, head_dim) fill slots 0..n-1."""
        self.runner.write_prefix(kv_layers)
        self.length = kv_layers[0][0].shape[2] if kv_layers else 0

    def load_stacked(self, kv: torch.Tensor) -> None:
        """``load`` from every layer's K/V in one tensor (2 * layers, B, heads, n, head_dim): layer i's
        key at 2i, its value at 2i + 1."""
        self.runner.write_stacked(kv)
        self.length = kv.shape[3]


@dataclass
class _Graph:
    graph: object
    ids: torch.Tensor         # (B, n) static inputs
    positions: torch.Tensor   # (B, n)
    slots: torch.Tensor       # (n,) cache slots written
    logits: torch.Tensor      # (B, n, V) static output
    hidden: torch.Tensor | None = None  # (B, n, H) the last decoder layer's output (for feature drafts)


def slot_bucket(n: int) -> int:
    """Round a slot count up: 2048 or 4096, then a multiple of 4096 (few buckets: few captures;
    attention over unused masked slots costs little at decode sizes)."""
    if n <= 4096:
        return 2048 if n <= 2048 else 4096
    return -(-n // 4096) * 4096


_PREFILL_BUCKETS = (32, 64, 128, 256)
DRAFT_GRAPH_TOKENS = 8                 # a draft model's largest graph-captured forward  # suffix lengths (after a cached prefix) run as padded graphs
_MIN_WINDOW = 256                      # smallest attention window (key slots a forward reads)


def _attend_bucket(used: int, max_len: int) -> int:
    """Key slots a forward whose last slot is ``used - 1`` attends over: a power of two >= 256
    (few windows: few graphs), at most ``max_len``. Attention reads only these slots."""
    window = _MIN_WINDOW
    while window < used:
        window *= 2
    return min(window, max_len)


def _attend_buckets(max_len: int) -> list[int]:
    """Every window ``_attend_bucket`` can return for this ``max_len``."""
    out, window = [], _MIN_WINDOW
    while window < max_len:
        out.append(window)
        window *= 2
    return out + [max_len]


def _prefill_bucket(n: int) -> int | None:
    """The smallest graph size that holds an n-token suffix, None if n is past the largest."""
    return next((b for b in _PREFILL_BUCKETS if n <= b), None)


class StaticRunner:
    """``ModelRunner``'s interface over a preallocated HF ``StaticCache`` (+ CUDA graphs)."""

    def __init__(self, model: torch.nn.Module, batch_size: int, max_len: int, use_graphs: bool | None = None,
                 graph_max_tokens: int = 17, fuse: bool = False, kv_bits: int | None = None, join: bool = True):
        from transformers import StaticCache
        from transformers.cache_utils import StaticLayer

        reason = unsupported_reason(model)
        if reason:
            raise ValueError(reason)
        self._model_ref = weakref.ref(model)
        self.batch_size, self.max_len = batch_size, max_len
        self.graph_max_tokens = graph_max_tokens
        emb = model.get_input_embeddings().weight
        self._device, self._dtype = emb.device, emb.dtype
        self._vocab = model.get_output_embeddings().weight.shape[0]
        self._hf_cache = StaticCache(config=model.config, max_cache_len=max_len)
        odd = sorted({type(layer).__name__ for layer in self._hf_cache.layers if type(layer) is not StaticLayer})
        if odd:
            raise ValueError(f"{type(model).__name__}'s static cache has {', '.join(odd)} layers (sliding window "
                             "or other): only plain full-attention layers are supported")
        if kv_bits not in (None, 4, 8):
            raise ValueError(f"kv_bits must be None, 8 or 4, got {kv_bits!r}")
        self.kv_bits = kv_bits                # int8/int4 codes instead of the StaticCache's own buffers
        for layer in self._hf_cache.layers:
            layer.update = self._layer_update(layer)
            layer.codes = None                # (keys QTensor, values QTensor) when kv_bits is set
        self._write_slots: torch.Tensor | None = None
        # every layer's K/V storage as one tensor (_allocate); False: the layers' K/V differ in shape
        self._kv: torch.Tensor | bool | None = None
        self._layer_index = {id(layer): i for i, layer in enumerate(self._hf_cache.layers)}
        self._additive = model.config._attn_implementation == "eager"
        self._cache_position = accepts(model, "cache_position")
        self._cache_keyword = cache_keyword(model)
        self._arange = torch.arange(max_len, device=self._device)
        self._key_slots = torch.zeros(batch_size, max_len, dtype=torch.bool, device=self._device)
        if use_graphs is None:
            use_graphs = self._device.type == "cuda"
        self.use_graphs = use_graphs
        self._graphs: dict[tuple[int, int], _Graph] = {}      # (tokens, attention window) -> graph
        self._warm: set[tuple[int, int]] = set()              # shapes compiled without a graph (CPU)
        self._attend = max_len                               # key slots attention reads this forward
        groups = getattr(model.config.get_text_config(), "num_attention_heads", 1) // max(
            1, getattr(model.config.get_text_config(), "num_key_value_heads", None) or 1)
        self._packed_gqa = model.config._attn_implementation == "sdpa" and groups > 1
        self._pool = None
        self._forward = _compiled_call() if fuse else _call
        self._fused = fuse
        self._projections = join_projections(model) if join else []
        self._signature = weights_signature(model)   # after joining, which moves the joined weights
        self._watching = False                       # inside watching_features(): keep each forward's features
        self._hidden: torch.Tensor | None = None     # the last decoder layer's output, set by _keep_hidden
        self._features: torch.Tensor | None = None   # what take_features() hands out

    # -- ModelRunner interface -------------------------------------------------------------

    @property
    def model(self) -> torch.nn.Module:
        model = self._model_ref()
        if model is None:
            raise RuntimeError("the model of this StaticRunner was freed")
        return model

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def vocab_size(self) -> int:
        return self._vocab

    def new_cache(self) -> StaticSlots:
        """An empty cache (length 0) over this runner's storage: one live cache per runner."""
        return StaticSlots(self)

    @contextmanager
    def watching_features(self):
        """As ``ModelRunner.watching_features``: each forward inside keeps its last decoder layer's
        output at every position (``take_features``). A graph replay hands out a copy of the
        output its capture recorded (every capture records it, watching or not)."""
        self._watching = True
        try:
            with self._hidden_hook():
                yield self
        finally:
            self._watching, self._features, self._hidden = False, None, None

    def take_features(self) -> torch.Tensor:
        """(B, n, H) the latest forward's last-layer outputs (before the final norm); once."""
        features, self._features = self._features, None
        if features is None:
            raise RuntimeError("no features kept: run forward() inside StaticRunner.watching_features()")
        return features

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, key_mask: torch.Tensor, positions: torch.Tensor,
                cache: StaticSlots, last_only: bool = False) -> torch.Tensor:
        """Logits (B, n, V) for ``tokens`` (B, n) written at slots ``cache.length ..``; see ModelRunner."""
        if not isinstance(cache, StaticSlots) or cache.runner is not self:
            raise ValueError("StaticRunner.forward needs a cache from this runner's new_cache()")
        if cache.rows is not None:                      # some rows finished: idle rows ride along
            return self._forward_rows(tokens, key_mask, positions, cache, last_only)
        B, n = tokens.shape
        start = cache.length
        if B != self.batch_size:
            raise ValueError(f"this static cache holds batch size {self.batch_size}, got {B} rows")
        if tuple(key_mask.shape) != (B, start + n):
            raise ValueError(f"key_mask shape {tuple(key_mask.shape)} != {(B, start + n)}")
        if start + n > self.max_len:
            raise ValueError(f"static cache full: {start} + {n} slots > max_len {self.max_len}")
        dev = self._device
        tokens, positions = tokens.to(dev), positions.to(dev)
        self._key_slots[:, : start + n].copy_(key_mask.to(dev))
        self._key_slots[:, start + n:].zero_()
        slots = self._arange[start: start + n]
        bucket = _prefill_bucket(n) if n > self.graph_max_tokens else None
        self._attend = _attend_bucket(start + (bucket or n), self.max_len)
        self._hidden = None
        if self.use_graphs and n <= self.graph_max_tokens and self._initialized():
            logits = self._replay(tokens, positions, slots)
        elif self.use_graphs and start > 0 and bucket and start + bucket <= self.max_len and self._initialized():
            logits = self._replay_padded(tokens, positions, start, bucket)
        elif start == 0 and n > self.graph_max_tokens:
            logits = self._prefill(tokens, key_mask.to(dev), positions, last_only)
        else:
            logits = self._run(tokens, positions, slots)
        if self._watching:
            self._features = self._hidden[:, :n]
        cache.length = start + n
        return logits[:, -1:] if last_only else logits

    # -- internals --------------------------------------------------------------------------

    def _forward_rows(self, tokens, key_mask, positions, cache: StaticSlots, last_only: bool) -> torch.Tensor:
        """A forward of the active rows only: scattered into the full batch (idle rows get token 0
        and no keys; what they write lands in their own, unused, cache rows), gathered back."""
        rows, B, dev = cache.rows, self.batch_size, self._device
        full = [torch.zeros((B, *t.shape[1:]), dtype=t.dtype, device=dev).index_copy_(0, rows, t.to(dev))
                for t in (tokens, key_mask, positions)]
        cache.rows = None
        try:
            logits = self.forward(*full, cache, last_only)
        finally:
            cache.rows = rows
        if self._features is not None:
            self._features = self._features.index_select(0, rows)
        return logits.index_select(0, rows)

    def _layer_update(self, layer):
        runner = self

        def update(key_states, value_states, *args, **kwargs):
            window = getattr(layer, "window", None)          # views of the slots attention reads (see _run)
            # writing through the window, not the whole buffer: a compiled forward then sees one
            # tensor (no aliased inputs), so Inductor writes the new slots in place instead of
            # copying the whole buffer out and back (2 copies per layer per step otherwise)
            runner._store(layer, runner._write_slots, key_states, value_states, into=window)
            if window is None:                                # storage allocated just now, by this forward
                window = runner._window(layer, mark=False)
            if runner.kv_bits is None:
                return window
            return tuple(dequantize_token_groups(q, runner.kv_bits, runner._dtype) for q in window)

        return update

    def _store(self, layer, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor, into: tuple | None = None) -> None:
        """Write K/V (B, heads, n, head_dim) at ``slots`` (n,): as they are, or quantized per token.
        ``into``: the layer's attention window (views covering ``slots``) to write through."""
        if self.kv_bits is None:
            if not layer.is_initialized:
                self._allocate(layer, k, v)
            keys, values = into if into is not None else (layer.keys, layer.values)
            keys.index_copy_(2, slots, k.to(keys.dtype))
            values.index_copy_(2, slots, v.to(values.dtype))
            return
        new = [quantize_token_groups(x.to(self._dtype), self.kv_bits) for x in (k, v)]
        if layer.codes is None:
            layer.codes = tuple(QTensor(*(t.new_zeros(*t.shape[:2], self.max_len, t.shape[3]) for t in q))
                                for q in new)
        for buffers, q in zip(into if into is not None else layer.codes, new):
            for buffer, t in zip(buffers, q):
                buffer.index_copy_(2, slots, t)

    def _ready(self, layer) -> bool:
        return layer.is_initialized if self.kv_bits is None else layer.codes is not None

    def _prefill(self, tokens, key_mask, positions, last_only: bool, scratch=None) -> torch.Tensor:
        """A prompt from slot 0: the ordinary HF path (2D mask, flash/causal SDPA) over a
        DynamicCache, then one copy per layer into the static cache. A 4D mask over all
        max_len slots would force a slower attention kernel for the long prefill.
        ``scratch``: a DynamicCache already holding the first slots (``prefill_after``)."""
        from transformers import DynamicCache

        scratch = DynamicCache() if scratch is None else scratch
        kwargs = {"logits_to_keep": 1} if last_only and accepts(self.model, "logits_to_keep") else {}
        kwargs[self._cache_keyword] = scratch
        out = self.model(input_ids=tokens, attention_mask=key_mask, position_ids=positions,
                         use_cache=True, **kwargs)
        for layer, source in zip(self._hf_cache.layers, scratch.layers):
            self._store(layer, self._arange[:source.keys.shape[2]], source.keys, source.values)
        return out.logits

    @torch.inference_mode()
    def prefill_after(self, cache: StaticSlots, scratch, tokens: torch.Tensor, key_mask: torch.Tensor,
                      positions: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """Logits (B, n, V) for ``tokens`` (B, n) run after the K/V ``scratch`` holds (a DynamicCache of
        full-precision slots 0..start-1, e.g. a prefix-cache hit; empty: a whole prompt) on the
        ordinary HF path, as an uncached prompt runs (``forward`` from slot 0). All ``start + n``
        slots are then written into the static cache (quantized per token when ``kv_bits``);
        ``scratch`` keeps them in full precision."""
        if not isinstance(cache, StaticSlots) or cache.runner is not self or cache.rows is not None:
            raise ValueError("prefill_after needs a fresh cache from this runner's new_cache()")
        B, n = tokens.shape
        start = int(scratch.get_seq_length())
        if B != self.batch_size or tuple(key_mask.shape) != (B, start + n) or start + n > self.max_len:
            raise ValueError(f"prefill_after: {B} rows of {n} tokens after {start} slots do not fit this runner "
                             f"(batch {self.batch_size}, max_len {self.max_len}) or key_mask {tuple(key_mask.shape)}")
        dev = self._device
        self._key_slots[:, : start + n].copy_(key_mask.to(dev))
        self._key_slots[:, start + n:].zero_()
        self._hidden = None
        logits = self._prefill(tokens.to(dev), key_mask.to(dev), positions.to(dev), last_only, scratch)
        if self._watching:
            self._features = self._hidden[:, :n]
        cache.length = start + n
        return logits[:, -1:] if last_only else logits

    def _window(self, layer, mark: bool = True) -> tuple:
        """The layer's K and V over the slots this forward attends to (views; QTensors of views when
        quantized). ``mark``: let torch.compile keep their size dynamic."""
        a = self._attend
        if self.kv_bits is None:
            window = (layer.keys[:, :, :a], layer.values[:, :, :a])
            views = window
        else:
            window = tuple(QTensor(*(t[:, :, :a] for t in q)) for q in layer.codes)
            views = [t for q in window for t in q]
        if self._fused and mark:
            for view in views:
                torch._dynamo.maybe_mark_dynamic(view, 2)
        return window

    @torch.inference_mode()
    def write_prefix(self, kv_layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Copy per-layer (key, value) (B, heads, n, head_dim) into slots 0..n-1 (a prefix-cache hit).
        Into allocated full-precision storage, every layer's copy goes in one call (``_foreach_copy_``):
        no Python per layer on the hit's path."""
        layers = self._hf_cache.layers
        if len(kv_layers) != len(layers):
            raise ValueError(f"got K/V for {len(kv_layers)} layers, the static cache has {len(layers)}")
        n = kv_layers[0][0].shape[2] if kv_layers else 0
        if self.kv_bits is None and self._initialized():
            targets = [t[:, :, :n] for layer in layers for t in (layer.keys, layer.values)]
            torch._foreach_copy_(targets, [t.to(self._device) for pair in kv_layers for t in pair])
            return
        for layer, (k, v) in zip(layers, kv_layers):
            self._store(layer, self._arange[:n], k.to(self._device), v.to(self._device))

    @torch.inference_mode()
    def write_stacked(self, kv: torch.Tensor) -> None:
        """``write_prefix`` from one tensor (2 * layers, B, heads, n, head_dim) (layer i's key at 2i, its
        value at 2i + 1): one copy where every layer's storage is a view of one tensor (``_allocate``)."""
        shared = self._kv if isinstance(self._kv, torch.Tensor) else None
        if shared is not None and self._initialized() and kv.shape[:3] == shared.shape[:3] \
                and kv.shape[4] == shared.shape[4]:
            shared[:, :, :, : kv.shape[3]].copy_(kv)
            return
        self.write_prefix([(kv[2 * i], kv[2 * i + 1]) for i in range(kv.shape[0] // 2)])

    def _allocate(self, layer, k: torch.Tensor, v: torch.Tensor) -> None:
        """Allocate a layer's storage on its first write: as HF does, then, where the layer's K and V fit
        it, moved to views of one tensor for all layers, (2 * layers, B, heads, max_len, head_dim), so
        that a prefix-cache hit is one copy (``write_stacked``). A layer that does not fit (K/V shapes
        differ across layers) leaves every layer its own storage. Not under torch.compile (``fuse``:
        it would see the views as aliased inputs) nor once a graph is captured (it read the addresses)."""
        layer.lazy_initialization(k, v)
        if self._fused or self._graphs or self._kv is False:
            return
        keys, values = layer.keys, layer.values
        spec = (keys.shape, keys.dtype, keys.device)
        if self._kv is None and (values.shape, values.dtype, values.device) == spec:
            self._kv = keys.new_zeros((2 * len(self._hf_cache.layers), *keys.shape))
        shared = self._kv is not None and all((t.shape, t.dtype, t.device) == (self._kv.shape[1:], self._kv.dtype,
                                                                               self._kv.device) for t in (keys, values))
        if not shared:
            self._kv = False                 # layers already moved keep their views: valid storage still
            return
        i = self._layer_index[id(layer)]
        layer.keys, layer.values = self._kv[2 * i], self._kv[2 * i + 1]

    def _replay_padded(self, tokens, positions, start: int, bucket: int) -> torch.Tensor:
        """A suffix after a cached prefix, padded to ``bucket`` tokens so that a graph runs it.
        The padding writes KV past the real slots: masked, and overwritten by the next forward."""
        B, n = tokens.shape
        pad = bucket - n
        tokens = torch.cat([tokens, tokens.new_zeros(B, pad)], dim=1)
        positions = torch.cat([positions, positions[:, -1:] + torch.arange(1, pad + 1, device=self._device)], dim=1)
        return self._replay(tokens, positions, self._arange[start: start + bucket])[:, :n]

    def _initialized(self) -> bool:
        return all(self._ready(layer) for layer in self._hf_cache.layers)

    def _mask(self, slots: torch.Tensor) -> torch.Tensor:
        """(B, 1, n, attend): key slot enabled for the row and not after the query's own slot."""
        keys, window = self._key_slots[:, : self._attend], self._arange[: self._attend]
        allowed = keys[:, None, :] & (window[None, None, :] <= slots[None, :, None])
        # a query with no key at all (a left-padding slot) would give NaN; its output is never used
        allowed = allowed | ~allowed.any(-1, keepdim=True)
        allowed = allowed[:, None]
        if not self._additive:
            return allowed
        zero = torch.zeros((), dtype=self._dtype, device=self._device)
        return torch.where(allowed, zero, torch.finfo(self._dtype).min)

    def _run(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        # always inference tensors (a warm-up makes them in inference mode, a caller may not): torch.compile
        # guards on the dispatch keys, and a mix would compile every shape twice, once inside the loop
        tokens, positions = (t if t.is_inference() else t.clone() for t in (tokens, positions))
        self._write_slots = slots
        kwargs = {"cache_position": slots} if self._cache_position else {}
        kwargs[self._cache_keyword] = self._hf_cache
        for layer in self._hf_cache.layers:
            # views made here, not inside the (compiled) forward: torch.compile sees the window as a
            # tensor size, which it can keep dynamic, rather than an int it would specialize on
            layer.window = self._window(layer) if self._ready(layer) else None
        with attention_implementation(self.model, PACKED_GQA if self._packed_gqa else None), \
                fused_projections(self._projections):
            return self._forward(self.model, input_ids=tokens, attention_mask=self._mask(slots),
                                 position_ids=positions, use_cache=True, **kwargs)

    def _replay(self, tokens, positions, slots) -> torch.Tensor:
        n = tokens.shape[1]
        entry = self._graphs.get((n, self._attend))
        if entry is None:
            try:
                entry = self._capture(tokens, positions, slots)
            except Exception as exc:  # noqa: BLE001 - any capture failure: stay correct, go eager
                _warn_once(f"CUDA graph capture failed for {type(self.model).__name__} ({type(exc).__name__}: "
                           f"{exc}); running it eagerly over the static cache")
                self.use_graphs = False
                if torch.cuda.is_available():
                    torch.cuda.synchronize(self._device)
                return self._run(tokens, positions, slots)
            self._graphs[(n, self._attend)] = entry
        entry.ids.copy_(tokens)
        entry.positions.copy_(positions)
        entry.slots.copy_(slots)
        entry.graph.replay()
        if self._watching:  # the capture's own output buffer, which the next replay overwrites
            self._hidden = entry.hidden.clone()
        return entry.logits.clone()  # the next replay overwrites the static output

    def capture_all(self) -> None:
        """Capture every decode size 1..graph_max_tokens for every attention window now (before a
        prefill: it writes throwaway KV at slots 0..n-1, which the prefill overwrites), so no
        capture, and no torch.compile compilation, ever lands inside a timed decode loop, whatever
        k or context length comes later. Without graphs (CPU) a fused runner still runs each
        shape once here, for the compilation."""
        graphs = self.use_graphs and torch.cuda.is_available() and self._device.type == "cuda"
        if not (graphs or self._fused):
            return
        todo = [(n, window) for window in _attend_buckets(self.max_len) for n in range(1, self.graph_max_tokens + 1)
                if (n, window) not in self._graphs and (n, window) not in self._warm]
        if not todo:
            return
        what = "compiling and capturing" if self._fused else "capturing CUDA graphs"
        progress = tqdm(total=len(todo), desc=f"specdec: {what} for {type(self.model).__name__} "
                        f"(batch {self.batch_size}, once per model)", leave=False, unit="graph")
        with torch.inference_mode(), progress:
            for n, window in todo:
                self._attend = window
                tokens = torch.zeros(self.batch_size, n, dtype=torch.long, device=self._device)
                positions = self._arange[:n].expand(self.batch_size, n)
                self._key_slots.zero_()
                self._key_slots[:, :n] = True
                if not self._initialized():
                    self._run(tokens, positions, self._arange[:n])  # lazy cache-layer allocation
                if graphs and self.use_graphs:  # (a failed capture turns graphs off for the rest)
                    self._replay(tokens, positions, self._arange[:n])
                elif self._fused:
                    self._run(tokens, positions, self._arange[:n])
                    self._warm.add((n, window))
                progress.update()
            self._key_slots.zero_()

    def _capture(self, tokens, positions, slots) -> _Graph:
        """Warm up on a side stream (these runs write this step's KV, as the replay will), then capture.
        One capture at a time, with no generate() call of another thread running meanwhile
        (``specdec.device_lock``), and in thread-local mode."""
        global captures
        with DEVICE.exclusive():
            entry = self._capture_alone(tokens, positions, slots)
        with _LOCK:
            captures += 1
        return entry

    def _capture_alone(self, tokens, positions, slots) -> _Graph:
        ids, pos, sl = tokens.clone(), positions.clone(), slots.clone()
        side = torch.cuda.Stream(self._device)
        side.wait_stream(torch.cuda.current_stream(self._device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._run(ids, pos, sl)
        torch.cuda.current_stream(self._device).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # record the last layer's output buffer for feature drafts (not under torch.compile: a hook
        # added there would recompile the fused forward; generate() refuses feature drafts with it)
        with (nullcontext() if self._fused else self._hidden_hook()), \
                torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            logits = self._run(ids, pos, sl)
        return _Graph(graph, ids, pos, sl, logits, self._hidden)

    @contextmanager
    def _hidden_hook(self):
        """Inside: every forward leaves its last decoder layer's output in ``self._hidden``."""
        handle = hook_last_layer(self.model, self._keep_hidden)
        try:
            yield
        finally:
            handle.remove()

    def _keep_hidden(self, hidden: torch.Tensor) -> None:
        self._hidden = hidden


def _call(model: torch.nn.Module, **inputs) -> torch.Tensor:
    return model(**inputs).logits


def _compiled_call():
    """``torch.compile(_call)`` over a fresh code object: dynamo keeps its cache (and its
    recompile limit) per code object, and each runner compiles its own model. The model is
    an argument, not a closure, so the compiled function does not keep it alive. Shapes:
    n = 1 compiles once, n >= 2 once more with n dynamic."""
    global _compiled
    with _LOCK:
        _compiled += 1
        name = f"_call_{_compiled}"
    code = _call.__code__.replace(co_name=name, co_qualname=name)
    return torch.compile(types.FunctionType(code, _call.__globals__, code.co_name), dynamic=None)


def unsupported_reason(model: torch.nn.Module) -> str | None:
    """Why the static path cannot run this model (None if it can)."""
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        return f"{type(model).__name__} is an encoder-decoder model"
    if cache_keyword(model) is None:
        return f"{type(model).__name__}.forward takes no cache (past_key_values)"
    for name in ("position_ids", "attention_mask"):
        if not accepts(model, name):
            return f"{type(model).__name__}.forward takes no {name}"
    impl = getattr(config, "_attn_implementation", None) or "eager"
    if impl not in ("sdpa", "eager"):
        return f"attention implementation {impl!r} cannot take a ready 4D mask (use 'sdpa' or 'eager')"
    return None


def static_runner(model: torch.nn.Module, batch_size: int, max_len: int, role: str = "target",
                  graph_max_tokens: int = 17, fuse: bool = False, kv_bits: int | None = None):
    """A (cached) ``StaticRunner`` with at least ``max_len`` slots, checked out for the caller alone:
    hand it back with ``give_back`` when the call ends (also when it fails). A free copy is reused,
    else a new one is built (at most ``MAX_COPIES`` per key, then this waits for one to come back).
    Where the static path does not fit this model: the eager ``ModelRunner``, with a warning (once)."""
    emb = model.get_input_embeddings().weight
    base = (id(model), role, batch_size, emb.dtype, emb.device, fuse, kv_bits, slot_bucket(max_len))
    with DEVICE.released(), _RETURNED:    # waiting for another call's runner: let captures through
        runner, copy = _free_runner(model, base)
        while runner is None and copy is None:
            _RETURNED.wait()
            runner, copy = _free_runner(model, base)
        if runner is None:
            try:   # under the lock: joining the model's projections must not run twice at once
                runner = StaticRunner(model, batch_size, base[-1], graph_max_tokens=graph_max_tokens, fuse=fuse,
                                      kv_bits=kv_bits)
            except Exception as exc:  # noqa: BLE001 - unsupported architecture / cache: eager fallback
                _warn_once(f"compile=True: {type(model).__name__} falls back to the eager runner: {exc}")
                return ModelRunner(model)
            _RUNNERS[base + (copy,)] = runner
            weakref.finalize(model, _RUNNERS.pop, base + (copy,), None)
        _BUSY.add(runner)
    runner.graph_max_tokens = graph_max_tokens
    return runner


def _free_runner(model: torch.nn.Module, base: tuple) -> tuple["StaticRunner | None", int | None]:
    """(an idle runner of ``base``, None), or (None, a free copy number to build), or (None, None):
    all ``MAX_COPIES`` busy. Drops runners whose weights were replaced since (quantized, .to(),
    reloaded: their graphs read old memory). Call under ``_LOCK``."""
    signature, free = None, None
    for copy in range(MAX_COPIES):
        runner = _RUNNERS.get(base + (copy,))
        if runner is not None and runner not in _BUSY:
            signature = signature or weights_signature(model)
            if runner._model_ref() is not model or runner._signature != signature:
                _RUNNERS.pop(base + (copy,), None)
                runner = None
            else:
                return runner, None
        if runner is None and free is None:
            free = copy
    return None, free


def give_back(*runners) -> None:
    """Return runners that ``static_runner`` checked out (anything else, e.g. an eager
    ``ModelRunner``, is ignored), so the next call can use them."""
    with _RETURNED:
        for runner in runners:
            if isinstance(runner, StaticRunner):
                _BUSY.discard(runner)
        _RETURNED.notify_all()


def weights_signature(model: torch.nn.Module) -> tuple:
    """Where every parameter and buffer lives: a captured graph reads these addresses, so a runner
    whose model no longer matches (a module swapped, a tensor moved) must not replay."""
    return tuple(t.data_ptr() for t in module_tensors(model))


def release(model: torch.nn.Module) -> int:
    """Drop the static runners (caches, CUDA graphs) kept for ``model``; returns how many. Needed after
    replacing the model's weights (``.to()``, quantizing, loading) between ``compile=True`` calls."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"release needs the model (a torch.nn.Module) passed to generate, got {type(model).__name__}")
    with _LOCK:
        keys = [key for key in list(_RUNNERS) if getattr(_RUNNERS.get(key), "_model_ref", lambda: None)() is model]
        for key in keys:
            _RUNNERS.pop(key, None)
    if keys:
        gc.collect()  # a runner sits in reference cycles (its caches and graphs point back at it): free it now
    return len(keys)


@dataclass
class StaticSetup:
    """What ``use_static`` checked out for one generate() call: each runner with a fresh cache of it
    (the draft's: None without a draft model). ``taken`` goes to ``give_back`` when the call ends."""

    runner: object
    cache: object
    draft_runner: object = None
    draft_cache: object = None
    taken: list = field(default_factory=list)


def use_static(target: torch.nn.Module, draft: torch.nn.Module | None, *, batch_size: int, prompt_len: int,
               max_new_tokens: int, k_max: int, kv_quant=None, prefix_cache=None, fuse: bool = False) -> StaticSetup:
    """Static runners for the target and the draft model (if any) of a generate() call, before its
    prefill (``fuse``: torch.compile the forwards before capturing them; see the module docstring).

    Runners hold a power-of-two batch: a call of 3 rows runs on a runner of 4 with one row idle
    from the start, so calls of other batch sizes (a pipeline's last, smaller batch) reuse graphs.
    With a prefix cache the runner holds exactly the call's rows (hits are written row by row).
    The caller hands ``taken`` to ``give_back`` when the call ends, in a ``finally``; if this
    fails, it gives back what it took itself."""
    # room for a cached prefix's suffix padded up to its graph size
    max_len = prompt_len + max_new_tokens + k_max + 2 + (_PREFILL_BUCKETS[-1] if prefix_cache else 0)
    rows = batch_size if prefix_cache is not None else batch_bucket(batch_size)
    kv_bits = {None: None, "int8": 8, "int4": 4}[kv_quant]
    taken = []
    try:
        runner = static_runner(target, rows, max_len, "target", graph_max_tokens=k_max + 1, fuse=fuse,
                               kv_bits=kv_bits)
        taken.append(runner)
        _capture_all(runner)
        setup = StaticSetup(runner, _cache_for(runner, batch_size), taken=taken)
        if draft is not None:
            # the draft feeds 1 token per forward, 2 after a step that accepted every draft, and catches
            # up after plain stretches in chunks of DRAFT_GRAPH_TOKENS
            setup.draft_runner = static_runner(draft, rows, max_len, "draft", graph_max_tokens=DRAFT_GRAPH_TOKENS,
                                               fuse=fuse)
            taken.append(setup.draft_runner)
            _capture_all(setup.draft_runner)
            setup.draft_cache = _cache_for(setup.draft_runner, batch_size)
    except BaseException:
        give_back(*taken)
        raise
    return setup


def runners_of(model: torch.nn.Module) -> dict:
    """What the static path holds for ``model``: its runners, whether each still uses CUDA graphs,
    and the graphs they captured (for benchmarks and diagnostics)."""
    with _LOCK:
        runners = [r for r in _RUNNERS.values() if r._model_ref() is model]
        return {"static_runners": len(runners), "use_graphs": [bool(r.use_graphs) for r in runners],
                "graphs": sum(len(r._graphs) for r in runners)}


def batch_bucket(batch_size: int) -> int:
    """The static batch that serves ``batch_size`` rows: the next power of two."""
    return 1 << max(batch_size - 1, 0).bit_length()


def _cache_for(runner, batch_size: int):
    """A fresh cache of ``runner`` for ``batch_size`` active rows (the runner's extra rows idle)."""
    cache = runner.new_cache()
    if isinstance(runner, StaticRunner) and runner.batch_size > batch_size:
        cache.rows = torch.arange(batch_size, device=runner.device)
    return cache


def _capture_all(runner) -> None:
    if isinstance(runner, StaticRunner):
        runner.capture_all()
