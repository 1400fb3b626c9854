"""Prefill through a prefix cache: only the part of the prompts no cache block covers runs.

Rows are left-padded, so row b's prompt occupies slots [pad_b, P). Each row looks up
its own tokens; slot ``start = min_b(pad_b + hit_b)`` is the first slot some row
must compute, and every row's KV before it comes from the cache (padding slots are
zeros, masked anyway). Rows that matched past ``start`` recompute a little: correct,
and the common single-prompt case wastes nothing.

A draft model's K/V lives in the same cache under a namespace of its own (``draft_namespace``):
the drafter's cache starts from its own hit (its own ``start``, found the same way), so its
first ``propose`` forwards only the rest of the prompt; finished rows store the draft's K/V of
the same slots as the target's. Feature drafts and static (``compile=True``) draft runners keep
prefilling the draft over the whole prompt (see ``ModelDrafter.reusable_cache``).
"""

from __future__ import annotations

import uuid
import weakref

import torch

from prefix_cache.hf_cache import cache_with_kv, check_supported, kv_from_cache
from specdec.state import positions_from_mask
from specdec.static import StaticSlots

# one uuid per draft module object, made on first use; weak keys: the entry dies with the module
_DRAFT_IDS: "weakref.WeakKeyDictionary[torch.nn.Module, str]" = weakref.WeakKeyDictionary()


def prefill_with_prefix_cache(run, input_ids: torch.Tensor, mask: torch.Tensor, prefix_cache, namespace):
    """Fill ``run.cache`` for the prompts reusing cached blocks; return last-position logits (B, 1, V).

    With ``run.draft_namespace`` set, the drafter's cache is started from the draft's own hit too.
    """
    model = run.runner.model
    check_supported(model.config)
    if getattr(run.runner, "make_cache", None) is not None or getattr(run.runner, "kv_bits", None):
        raise ValueError("prefix_cache cannot be combined with kv_quant yet: pass one of them")
    B, P = input_ids.shape
    pads = (P - mask.sum(-1)).tolist()
    host_ids = input_ids.cpu()
    start, kv = _load_rows(prefix_cache, host_ids, pads, namespace, input_ids.device)
    if kv is not None:
        if isinstance(run.cache, StaticSlots):
            run.cache.load(kv)                         # copied into the preallocated slots
        else:
            run.cache = cache_with_kv(kv, model.config)
    for b, pad in enumerate(pads):
        run.stats.cached_prompt_tokens[b] = max(start - pad, 0)
    if getattr(run, "draft_namespace", None) is not None:
        _, draft_kv = _load_rows(prefix_cache, host_ids, pads, run.draft_namespace, run.drafter.runner.device)
        if draft_kv is not None:
            run.drafter.load_prefix(draft_kv)
    positions = positions_from_mask(mask)[:, start:]
    return run.runner.forward(input_ids[:, start:], mask, positions, run.cache, last_only=True)


def _load_rows(prefix_cache, host_ids: torch.Tensor, pads: list[int], namespace, device):
    """(start, per-layer K/V of slots [0, start) or None): every row's hit under ``namespace``,
    ``start`` the first slot some row must compute (module docstring)."""
    hits = []  # filled inside try: a failing match (OOM, Ctrl-C) still releases the earlier rows' blocks
    try:
        for row, pad in zip(host_ids, pads):
            hits.append(prefix_cache.match(row[pad:], namespace))
        start = min(pad + h.num_tokens for pad, h in zip(pads, hits))
        return start, (_kv_from_hits(hits, pads, start, device) if start > 0 else None)
    finally:
        for h in hits:
            h.release()


def draft_namespace(drafter, prefix_cache, namespace: str | None) -> str | None:
    """The prefix-cache namespace of this call's draft model's K/V, or None: don't cache it.

    None unless the cache allows it (``PrefixCache(cache_drafts=True)``, the default) and the
    drafter is a ``ModelDrafter`` whose cache can be reused (``reusable_cache``). Prompt lookup
    has no K/V; a feature draft's K/V is computed from the target's features (kept for slots it
    ran, zeros for a hit's) and a static runner preallocates its slots, so both keep prefilling
    the draft over the prompt. The namespace joins the call's tenant key, an identity of the draft
    object that no other object ever gets (``draft_identity``) and the draft's K/V shapes.
    """
    if not getattr(prefix_cache, "cache_drafts", True) or not getattr(drafter, "reusable_cache", False):
        return None
    model = drafter.runner.model
    tenant = "" if namespace is None else "=" + namespace   # keeps None and "" apart, as the cache does
    return f"specdec-draft/{draft_identity(model)}/{_kv_shape_tag(model)}/{tenant}"


def draft_identity(model: torch.nn.Module) -> str:
    """A uuid for this module object, made the first time and kept while it lives.

    Not ``id()``: ids are reused after garbage collection, and a new draft must never read an
    old one's blocks. Kept beside the module (weak keys), not on it, so a copy gets its own.
    """
    return _DRAFT_IDS.setdefault(model, uuid.uuid4().hex)


def _kv_shape_tag(model: torch.nn.Module) -> str:
    """Layers, K/V heads, head dim and dtype: blocks of another shape must not be found (the same
    draft object after ``.to(dtype)``, or a config changed in place)."""
    config = model.config
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    dtype = str(model.get_input_embeddings().weight.dtype).removeprefix("torch.")
    return f"L{text.num_hidden_layers}-H{heads}-D{head_dim}-{dtype}"


def _kv_from_hits(hits, pads: list[int], start: int, device):
    """Per layer (key, value) (B, heads, start, head_dim): each row's cached KV placed after its padding.

    One ``torch.cat`` per hit builds its K/V for all layers at once (``kv_parts``); a single
    unpadded row is used as is (layers are views of it), a batch gets one copy per row.
    """
    parts = [h.kv_parts() if h.num_tokens else None for h in hits]
    reference = next(h for h in hits if h.num_tokens)
    if len(hits) == 1 and pads[0] == 0 and hits[0].num_tokens == start:
        batched = [p.to(device).unsqueeze(1) for p in parts[0]]       # (members, 1, heads, start, dim)
    else:
        batched = [p.new_zeros(p.shape[0], len(hits), p.shape[1], start, p.shape[3], device=device)
                   for p in next(x for x in parts if x is not None)]
        for b, (row, pad) in enumerate(zip(parts, pads)):
            take = start - pad
            if row is not None and take > 0:
                for out, p in zip(batched, row):
                    out[:, b, :, pad:start] = p[:, :, :take]
    return reference.layout.split(batched)


def store_rows(run, rows: list[int], prefix_cache, namespace) -> None:
    """Insert the given batch rows' prompt + output KV (valid slots only) into the cache; with
    ``run.draft_namespace`` set, the drafter's KV of the same slots too (those it has run: it may
    lag the target by a slot or two, which at most leaves its last block out)."""
    draft_ns = getattr(run, "draft_namespace", None)
    for i in rows:
        row_kv = run.cache.kv(i) if isinstance(run.cache, StaticSlots) else kv_from_cache(run.cache, row=i)
        _store_row(run.batch, i, row_kv, prefix_cache, namespace)
        if draft_ns is not None:
            _store_row(run.batch, i, run.drafter.row_kv(i), prefix_cache, draft_ns)


def _store_row(batch, i: int, row_kv, prefix_cache, namespace) -> None:
    """Insert batch row ``i``'s valid slots among the first ``T`` of ``row_kv`` (per layer (1, heads, T, dim))."""
    if not row_kv:
        return
    length = row_kv[0][0].shape[2]
    valid = batch.slot_mask[i, :length].bool().nonzero().flatten()
    if not valid.numel():
        return
    lo, hi = valid[[0, -1]].tolist()
    if hi - lo + 1 == valid.numel():                   # one run of slots (always for batch 1): views
        ids = batch.slot_tokens[i, lo:hi + 1]
        whole = lo == 0 and hi + 1 == length
        kv = row_kv if whole else [(k[:, :, lo:hi + 1], v[:, :, lo:hi + 1]) for k, v in row_kv]
    else:                                              # padding holes inside the row: gather
        ids = batch.slot_tokens[i, valid]
        kv = [(k[:, :, valid], v[:, :, valid]) for k, v in row_kv]
    prefix_cache.insert(ids, kv, namespace)
