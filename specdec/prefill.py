"""Prefill through a prefix cache: only the part of the prompts no cache block covers runs.

Rows are left-padded, so row b's prompt occupies slots [pad_b, P). Each row looks up
its own tokens; slot ``start = min_b(pad_b + hit_b)`` is the first slot some row
must compute, and every row's KV before it comes from the cache (padding slots are
zeros, masked anyway). Rows that matched past ``start`` recompute a little: correct,
and the common single-prompt case wastes nothing. A row whose mask has a hole after its
first token (not plain left padding) looks nothing up (hit 0): its slots before ``start``
are then all padding. Its valid tokens are still stored when it finishes.

Every block key holds the identity of the model that computed it (``PrefixCache.model_identity``,
computed once per call), so models sharing a cache never read each other's K/V.

With a quantized KV cache (``kv_quant``) the prompt runs in full precision over a plain
``DynamicCache`` started from the hit, as an uncached prefill runs it, and is then handed to the
quantized cache (which quantizes it as an uncached prefill would); the prompt's full-precision
K/V is stored right away, since the quantized cache keeps none to store when the row finishes.

A draft model's K/V lives in the same cache under a namespace of its own (``draft_namespace``):
the drafter's cache starts from its own hit (its own ``start``, found the same way), so its
first ``propose`` forwards only the rest of the prompt; finished rows store the draft's K/V of
the same slots as the target's. Feature drafts and static (``compile=True``) draft runners keep
prefilling the draft over the whole prompt (see ``ModelDrafter.reusable_cache``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specdec.prefix_cache import PrefixMatch
from specdec.prefix_cache.hf_cache import cache_with_kv, check_supported, kv_from_cache
from specdec.prefix_cache.identity import model_identity
from specdec.prefix_cache.store import Layout
from specdec.state import positions_from_mask
from specdec.static import StaticSlots


@dataclass(frozen=True)
class _Keys:
    """What one call's lookups of one model share: its identity in the cache and the shortest hit used."""

    identity: str | None
    min_tokens: int = 0


def target_identity(prefix_cache, model: torch.nn.Module) -> str | None:
    """The identity ``model``'s blocks are keyed by in ``prefix_cache`` (None: a cache of another kind,
    keyed by tokens and namespace only). generate() computes it once per call for the lookup and the store."""
    return prefix_cache.model_identity(model) if hasattr(prefix_cache, "model_identity") else None


def _target_keys(prefix_cache, model: torch.nn.Module, identity: str | None, min_tokens: int | None) -> _Keys:
    if identity is None:
        identity = target_identity(prefix_cache, model)
    if min_tokens is None:
        min_tokens = prefix_cache.hit_threshold(model) if hasattr(prefix_cache, "hit_threshold") else 0
    return _Keys(identity, min_tokens)


def prefill_with_prefix_cache(run, input_ids: torch.Tensor, mask: torch.Tensor, prefix_cache, namespace,
                              identity: str | None = None, min_tokens: int | None = None
                              ) -> tuple[torch.Tensor, int, object]:
    """Prefill the prompts reusing cached blocks: (the last-position logits (B, 1, V), ``start``, the first
    slot that ran (0: nothing was reused), the target's cache to decode on: ``run.cache`` filled, or a
    new one). Reads ``run``; the caller assigns what it returns.

    ``identity``: ``target_identity(prefix_cache, model)``; ``min_tokens``: the shortest hit to use
    (None: ``prefix_cache.hit_threshold(model)``). With ``run.draft_namespace`` set, the drafter's cache
    is started from the draft's own hit too.
    """
    model = run.runner.model
    check_supported(model.config)
    keys = _target_keys(prefix_cache, model, identity, min_tokens)
    P = input_ids.shape[1]
    pads, regular = _row_spans(mask)
    host_ids = input_ids.cpu()
    quantized = _quantizes(run.runner)
    # a quantized static runner's uncached prefill of a short prompt attends dequantized K/V, which no
    # hit reproduces: such a prompt runs as uncached, and looks nothing up for the target
    exact = not quantized or _quantized_hits_exact(run.runner, P)
    rows = regular if exact else [False] * len(pads)
    start, kv = _load_rows(prefix_cache, host_ids, pads, rows, namespace, keys, input_ids.device)
    for b, (pad, ok) in enumerate(zip(pads, rows)):
        run.stats.cached_prompt_tokens[b] = max(start - pad, 0) if ok else 0
    if getattr(run, "draft_namespace", None) is not None:
        # the draft's identity is in its namespace; a short prefix is cheaper to prefill for it too
        draft_min = prefix_cache.hit_threshold(model) if hasattr(prefix_cache, "hit_threshold") else 0
        _, draft_kv = _load_rows(prefix_cache, host_ids, pads, regular, run.draft_namespace,
                                 _Keys(None, draft_min), run.drafter.runner.device)
        if draft_kv is not None:
            run.drafter.load_prefix(draft_kv.layers())
    positions = positions_from_mask(mask)[:, start:]
    if not exact:
        return run.runner.forward(input_ids, mask, positions, run.cache, last_only=True), 0, run.cache
    if quantized:
        logits, cache = _prefill_quantized(run, input_ids, mask, positions, start, kv, prefix_cache, namespace, keys)
        return logits, start, cache
    cache = load_hit(run.cache, kv, model.config) if kv is not None else run.cache
    return run.runner.forward(input_ids[:, start:], mask, positions, cache, last_only=True), start, cache


def load_hit(cache, kv: HitKV, config):
    """The cache to decode on, started from a hit's K/V: copied into the slots of a static cache (one
    copy for all layers where their K/V share a shape), or handed as they are to the call's own empty
    ``DynamicCache`` (which never writes into them: its updates concatenate)."""
    if not isinstance(cache, StaticSlots):
        return cache_with_kv(kv.layers(), config, cache=cache)
    if kv.stacked() is not None:
        cache.load_stacked(kv.stacked())
    else:
        cache.load(kv.layers())
    return cache


def _quantizes(runner) -> bool:
    """Whether the runner's KV cache is quantized (``kv_quant``): its K/V cannot be stored back."""
    return getattr(runner, "make_cache", None) is not None or getattr(runner, "kv_bits", None) is not None


def _quantized_hits_exact(runner, prompt_len: int) -> bool:
    """Whether a hit can reproduce this runner's uncached prefill: the eager quantized cache
    prefills in full precision always, a quantized static runner only past ``graph_max_tokens``."""
    return getattr(runner, "kv_bits", None) is None or prompt_len > runner.graph_max_tokens


def _prefill_quantized(run, input_ids, mask, positions, start: int, kv, prefix_cache, namespace, keys: _Keys):
    """Run the prompt from slot ``start`` in full precision over a ``DynamicCache`` holding the hit,
    store every row's prompt blocks, then hand the K/V to a quantized cache: (logits, that cache)."""
    model, cache = run.runner.model, run.cache
    scratch = cache_with_kv(kv.layers(), model.config) if kv is not None else _empty_cache(model.config)
    tokens = input_ids[:, start:]
    if isinstance(cache, StaticSlots):
        logits = run.runner.prefill_after(cache, scratch, tokens, mask, positions, last_only=True)
    else:
        logits = run.runner.forward(tokens, mask, positions, scratch, last_only=True)
        cache = run.runner.new_cache()
        for i, (k, v) in enumerate(kv_from_layers(scratch)):
            cache.update(k, v, i)                      # what the quantized cache does with a whole prompt
    for i in range(input_ids.shape[0]):
        _store_row(input_ids[i], mask[i], kv_from_cache(scratch, row=i), prefix_cache, namespace, keys.identity)
    return logits, cache


def _empty_cache(config):
    from transformers import DynamicCache

    try:
        return DynamicCache(config=config)
    except TypeError:                                  # constructors without a `config` keyword
        return DynamicCache()


def kv_from_layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (key, value) (B, heads, T, head_dim) of a ``DynamicCache`` (all rows)."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def _row_spans(mask: torch.Tensor) -> tuple[list[int], list[bool]]:
    """Per row: its leading padding, and whether every slot after it is a real token (left padding
    only: the rows whose prompt can be looked up)."""
    m = mask.bool()
    lead = (~m).long().cumprod(-1).sum(-1)            # zeros before the first real token
    regular = m.sum(-1) == m.shape[1] - lead
    return lead.tolist(), regular.tolist()


def _load_rows(prefix_cache, host_ids: torch.Tensor, pads: list[int], regular: list[bool], namespace,
               keys: _Keys, device) -> tuple[int, HitKV | None]:
    """(start, the K/V of slots [0, start) or None): every row's hit under ``namespace``,
    ``start`` the first slot some row must compute (module docstring); (0, None) when no row hits."""
    hits = []  # filled inside try: a failing match (OOM, Ctrl-C) still releases the earlier rows' blocks
    try:
        match_rows(prefix_cache, host_ids, pads, regular, namespace, keys, into=hits)
        if not any(h is not None and h.num_tokens for h in hits):
            return 0, None
        start = min(pad + (h.num_tokens if h is not None else 0) for pad, h in zip(pads, hits))
        return start, (gather_rows(hits, pads, start, device) if start > 0 else None)
    finally:
        for h in hits:
            if h is not None:
                h.release()


def match_rows(prefix_cache, host_ids: torch.Tensor, pads: list[int], regular: list[bool], namespace,
               keys: _Keys, into: list) -> None:
    """Look up each row's tokens after its padding (rows not ``regular`` look nothing up: None),
    appending each match to ``into`` as it is made (the caller releases them, also on an error)."""
    for row, pad, ok in zip(host_ids, pads, regular):
        into.append(_match(prefix_cache, row[pad:], namespace, keys) if ok else None)


def _match(prefix_cache, ids: torch.Tensor, namespace, keys: _Keys):
    if not hasattr(prefix_cache, "hit_threshold"):     # a cache of another kind: the plain interface
        return prefix_cache.match(ids, namespace)
    return prefix_cache.match(ids, namespace, model=keys.identity, min_tokens=keys.min_tokens)


def draft_namespace(drafter, prefix_cache, namespace: str | None) -> str | None:
    """The prefix-cache namespace of this call's draft model's K/V, or None: don't cache it.

    None unless the cache allows it (``PrefixCache(cache_drafts=True)``, the default) and the
    drafter is a ``ModelDrafter`` whose cache can be reused (``reusable_cache``). Prompt lookup
    has no K/V; a feature draft's K/V is computed from the target's features (kept for slots it
    ran, zeros for a hit's) and a static runner preallocates its slots, so both keep prefilling
    the draft over the prompt. The namespace joins the call's tenant key, the draft's identity in
    the cache (``PrefixCache.model_identity``: no other object ever gets it, and it changes with
    the draft's weights) and the draft's K/V shapes.
    """
    if not getattr(prefix_cache, "cache_drafts", True) or drafter is None or not drafter.reusable_cache:
        return None
    model = drafter.runner.model
    tenant = "" if namespace is None else "=" + namespace   # keeps None and "" apart, as the cache does
    identity = prefix_cache.model_identity(model) if hasattr(prefix_cache, "model_identity") \
        else model_identity(model)
    return f"specdec-draft/{identity}/{_kv_shape_tag(model)}/{tenant}"


def _kv_shape_tag(model: torch.nn.Module) -> str:
    """Layers, K/V heads, head dim and dtype: blocks of another shape must not be found (the same
    draft object after ``.to(dtype)``, or a config changed in place)."""
    config = model.config
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    dtype = str(model.get_input_embeddings().weight.dtype).removeprefix("torch.")
    return f"L{text.num_hidden_layers}-H{heads}-D{head_dim}-{dtype}"


@dataclass(frozen=True)
class HitKV:
    """The K/V a hit hands the run: the cache layout's parts, each (members, B, heads, start, head_dim)."""

    parts: list[torch.Tensor]
    layout: Layout

    def layers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (key, value) (B, heads, start, head_dim): views of the parts."""
        return self.layout.split(self.parts)

    def stacked(self) -> torch.Tensor | None:
        """(2 * layers, B, heads, start, head_dim), layer i's key at 2i and value at 2i + 1, where every
        layer's K and V share a shape and a device; None otherwise."""
        return self.parts[0] if self.layout.fused and len(set(self.layout.devices)) == 1 else None


def gather_rows(hits, pads: list[int], start: int, device) -> HitKV:
    """Each row's cached K/V for slots [0, start), placed after its padding.

    A single unpadded row is used as the cache holds it: views of its blocks' storage where one insert
    stored them all (no copy; read-only, as ``load_hit`` uses them), else one ``torch.cat`` for all
    layers at once (``kv_parts``). A batch gets one zeroed tensor and one copy per row. ``hits``
    holds None for rows that looked nothing up; at least one row hit.
    """
    reference = next(h for h in hits if h is not None and h.num_tokens)
    if len(hits) == 1 and pads[0] == 0 and hits[0].num_tokens == start:
        parts = hits[0].kv_parts(copy=False) if isinstance(hits[0], PrefixMatch) else hits[0].kv_parts()
        batched = [p.to(device).unsqueeze(1) for p in parts]          # (members, 1, heads, start, dim)
        return HitKV(batched, reference.layout)
    parts = [h.kv_parts() if h is not None and h.num_tokens else None for h in hits]
    batched = [p.new_zeros(p.shape[0], len(hits), p.shape[1], start, p.shape[3], device=device)
               for p in next(x for x in parts if x is not None)]
    for b, (row, pad) in enumerate(zip(parts, pads)):
        take = start - pad
        if row is not None and take > 0:
            for out, p in zip(batched, row):
                out[:, b, :, pad:start] = p[:, :, :take]
    return HitKV(batched, reference.layout)


def store_rows(run, rows: list[int], prefix_cache, namespace) -> None:
    """Insert the given batch rows' prompt + output KV (valid slots only) into the cache; with
    ``run.draft_namespace`` set, the drafter's KV of the same slots too (those it has run: it may
    lag the target by a slot or two, which at most leaves its last block out). A quantized target
    cache stored its prompts' full-precision K/V at prefill and stores nothing here."""
    draft_ns = getattr(run, "draft_namespace", None)
    quantized = _quantizes(run.runner)
    identity = None
    if not quantized:
        identity = getattr(run, "target_identity", None) or target_identity(prefix_cache, run.runner.model)
    batch = run.batch
    for i in rows:
        if not quantized:
            row_kv = run.cache.kv(i) if isinstance(run.cache, StaticSlots) else kv_from_cache(run.cache, row=i)
            _store_row(batch.slot_tokens[i], batch.slot_mask[i], row_kv, prefix_cache, namespace, identity)
        if draft_ns is not None:
            _store_row(batch.slot_tokens[i], batch.slot_mask[i], run.drafter.row_kv(i), prefix_cache, draft_ns, None)


def _store_row(tokens: torch.Tensor, slot_mask: torch.Tensor, row_kv, prefix_cache, namespace, identity) -> None:
    """Insert one row's valid slots among the first ``T`` of ``row_kv`` (per layer (1, heads, T, dim));
    ``tokens``, ``slot_mask``: the row's token and validity per slot."""
    if not row_kv:
        return
    length = row_kv[0][0].shape[2]
    valid = slot_mask[:length].bool().nonzero().flatten()
    if not valid.numel():
        return
    lo, hi = valid[[0, -1]].tolist()
    if hi - lo + 1 == valid.numel():                   # one run of slots (always for batch 1): views
        ids = tokens[lo:hi + 1]
        whole = lo == 0 and hi + 1 == length
        kv = row_kv if whole else [(k[:, :, lo:hi + 1], v[:, :, lo:hi + 1]) for k, v in row_kv]
    else:                                              # padding holes inside the row: gather
        ids = tokens[valid]
        kv = [(k[:, :, valid], v[:, :, valid]) for k, v in row_kv]
    if identity is None:
        prefix_cache.insert(ids, kv, namespace)
    else:
        prefix_cache.insert(ids, kv, namespace, model=identity)
