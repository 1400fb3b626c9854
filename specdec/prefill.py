"""Prefill through a prefix cache: only the part of the prompts no cache block covers runs.

Rows are left-padded, so row b's prompt occupies slots [pad_b, P). Each row looks up
its own tokens; slot ``start = min_b(pad_b + hit_b)`` is the first slot some row
must compute, and every row's KV before it comes from the cache (padding slots are
zeros, masked anyway). Rows that matched past ``start`` recompute a little: correct,
and the common single-prompt case wastes nothing.
"""

from __future__ import annotations

import torch

from prefix_cache.hf_cache import cache_from_kv, check_supported, kv_from_cache
from specdec.state import positions_from_mask


def prefill_with_prefix_cache(run, input_ids: torch.Tensor, mask: torch.Tensor, prefix_cache, namespace):
    """Fill ``run.cache`` for the prompts reusing cached blocks; return last-position logits (B, 1, V)."""
    model = run.runner.model
    check_supported(model.config)
    if run.runner.make_cache is not None:
        raise ValueError("prefix_cache cannot be combined with kv_quant yet: pass one of them")
    B, P = input_ids.shape
    pads = (P - mask.sum(-1)).tolist()
    hits = [prefix_cache.match(row[pad:].tolist(), namespace) for row, pad in zip(input_ids, pads)]
    try:
        start = min(pad + h.num_tokens for pad, h in zip(pads, hits))
        if start > 0:
            run.cache = _cache_from_hits(hits, pads, start, model.config, input_ids.device)
    finally:
        for h in hits:
            h.release()
    for b, pad in enumerate(pads):
        run.stats.cached_prompt_tokens[b] = max(start - pad, 0)
    positions = positions_from_mask(mask)[:, start:]
    return run.runner.forward(input_ids[:, start:], mask, positions, run.cache, last_only=True)


def _cache_from_hits(hits, pads: list[int], start: int, config, device):
    """A DynamicCache of ``start`` slots: each row's cached KV placed after its padding."""
    reference = next(h for h in hits if h.num_tokens)
    layers = []
    kvs = [h.kv() if h.num_tokens else None for h in hits]
    for layer, (k0, v0) in enumerate(reference.kv()):
        keys = k0.new_zeros(len(hits), k0.shape[1], start, k0.shape[3])
        values = v0.new_zeros(len(hits), v0.shape[1], start, v0.shape[3])
        for b, (kv, pad) in enumerate(zip(kvs, pads)):
            take = start - pad
            if kv is not None and take > 0:
                keys[b, :, pad:start] = kv[layer][0][0, :, :take]
                values[b, :, pad:start] = kv[layer][1][0, :, :take]
        layers.append((keys.to(device), values.to(device)))
    return cache_from_kv(layers, config)


def store_rows(run, rows: list[int], prefix_cache, namespace) -> None:
    """Insert the given batch rows' prompt + output KV (valid slots only) into the cache."""
    batch = run.batch
    for i in rows:
        valid = batch.slot_mask[i].bool().nonzero().flatten()
        ids = batch.slot_tokens[i, valid].tolist()
        row_kv = kv_from_cache(run.cache, row=i)
        kv = [(k[:, :, valid], v[:, :, valid]) for k, v in row_kv]
        prefix_cache.insert(ids, kv, namespace)
