"""Prefill through a prefix cache: only the part of the prompts no cache block covers runs.

Rows are left-padded, so row b's prompt occupies slots [pad_b, P). Each row looks up
its own tokens; slot ``start = min_b(pad_b + hit_b)`` is the first slot some row
must compute, and every row's KV before it comes from the cache (padding slots are
zeros, masked anyway). Rows that matched past ``start`` recompute a little: correct,
and the common single-prompt case wastes nothing.
"""

from __future__ import annotations

import torch

from prefix_cache.hf_cache import cache_with_kv, check_supported, kv_from_cache
from specdec.state import positions_from_mask
from specdec.static import StaticSlots


def prefill_with_prefix_cache(run, input_ids: torch.Tensor, mask: torch.Tensor, prefix_cache, namespace):
    """Fill ``run.cache`` for the prompts reusing cached blocks; return last-position logits (B, 1, V)."""
    model = run.runner.model
    check_supported(model.config)
    if getattr(run.runner, "make_cache", None) is not None or getattr(run.runner, "kv_bits", None):
        raise ValueError("prefix_cache cannot be combined with kv_quant yet: pass one of them")
    B, P = input_ids.shape
    pads = (P - mask.sum(-1)).tolist()
    host_ids = input_ids.cpu()
    hits = []  # filled inside try: a failing match (OOM, Ctrl-C) still releases the earlier rows' blocks
    try:
        for row, pad in zip(host_ids, pads):
            hits.append(prefix_cache.match(row[pad:], namespace))
        start = min(pad + h.num_tokens for pad, h in zip(pads, hits))
        if start > 0:
            kv = _kv_from_hits(hits, pads, start, input_ids.device)
            if isinstance(run.cache, StaticSlots):
                run.cache.load(kv)                     # copied into the preallocated slots
            else:
                run.cache = cache_with_kv(kv, model.config)
    finally:
        for h in hits:
            h.release()
    for b, pad in enumerate(pads):
        run.stats.cached_prompt_tokens[b] = max(start - pad, 0)
    positions = positions_from_mask(mask)[:, start:]
    return run.runner.forward(input_ids[:, start:], mask, positions, run.cache, last_only=True)


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
    """Insert the given batch rows' prompt + output KV (valid slots only) into the cache."""
    batch = run.batch
    for i in rows:
        valid = batch.slot_mask[i].bool().nonzero().flatten()
        if not valid.numel():
            continue
        lo, hi = valid[[0, -1]].tolist()
        row_kv = run.cache.kv(i) if isinstance(run.cache, StaticSlots) else kv_from_cache(run.cache, row=i)
        if hi - lo + 1 == valid.numel():               # one run of slots (always for batch 1): views
            ids = batch.slot_tokens[i, lo:hi + 1]
            whole = lo == 0 and hi + 1 == row_kv[0][0].shape[2]
            kv = row_kv if whole else [(k[:, :, lo:hi + 1], v[:, :, lo:hi + 1]) for k, v in row_kv]
        else:                                          # padding holes inside the row: gather
            ids = batch.slot_tokens[i, valid]
            kv = [(k[:, :, valid], v[:, :, valid]) for k, v in row_kv]
        prefix_cache.insert(ids, kv, namespace)
