"""Attention for the fast path: grouped-query SDPA without repeating K/V.

With a ready 4D mask, HF's ``sdpa`` attention repeats every key/value head for each query
head it serves (``repeat_kv``) before calling SDPA: on a Llama-3-8B shape that copies the
whole K/V window 4x per layer per step, a few hundred MB per decode step. Here the query
heads of a group are folded into the query length instead: (B, H, n, D) ->
(B, H_kv, groups * n, D), the mask repeated along the query dim (a few KB), and one SDPA over
the K/V heads as stored. Exactly the same attention; no K/V copy.

``attention_implementation(model, PACKED_GQA)`` selects it for the duration of a forward
(HF looks the attention function up by ``config._attn_implementation`` at every call);
shapes it does not cover (no 4D mask, dropout, softcapping, position bias) go to HF's sdpa.
"""

from __future__ import annotations

import contextlib
import threading

import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import sdpa_attention_forward

PACKED_GQA = "specdec_packed_gqa_sdpa"


def packed_gqa_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                    is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """HF attention-interface function: query (B, H, n, D), key/value (B, H_kv, L, D), a 4D mask
    (B, 1, n, L) -> output (B, n, H, D)."""
    B, H, n, D = query.shape
    Hkv = key.shape[1]
    plain = (attention_mask is None or attention_mask.dim() != 4 or attention_mask.shape[1] != 1 or dropout
             or H == Hkv or H % Hkv or kwargs.get("softcap") is not None
             or kwargs.get("position_bias") is not None or kwargs.get("output_attentions"))
    if plain:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    groups = H // Hkv
    q = query.reshape(B, Hkv, groups * n, D)          # head h = kv * groups + g: its n queries stay together
    mask = attention_mask[:, :, None].expand(B, 1, groups, n, attention_mask.shape[-1])
    mask = mask.reshape(B, 1, groups * n, attention_mask.shape[-1])
    out = F.scaled_dot_product_attention(q, key, value, attn_mask=mask, scale=scaling)
    return out.reshape(B, H, n, D).transpose(1, 2).contiguous(), None


def register() -> None:
    """Make ``PACKED_GQA`` a valid ``config._attn_implementation`` (masks: HF's sdpa ones)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(PACKED_GQA, packed_gqa_sdpa)
    ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED_GQA, sdpa_mask)


_SWITCH = threading.Lock()
_ORIGINAL: dict[int, tuple[str, int]] = {}   # id(config) -> (implementation before, blocks inside)


@contextlib.contextmanager
def attention_implementation(model: torch.nn.Module, name: str | None):
    """Run the block with ``model.config._attn_implementation = name`` (None: leave it).

    Blocks may overlap (threads running one model): the first one in sets ``name`` and the
    last one out restores the original, so no block leaves the model switched."""
    if name is None:
        yield
        return
    register()
    config = model.config
    with _SWITCH:
        before, inside = _ORIGINAL.get(id(config), (config._attn_implementation, 0))
        _ORIGINAL[id(config)] = (before, inside + 1)
        config._attn_implementation = name
    try:
        yield
    finally:
        with _SWITCH:
            before, inside = _ORIGINAL.pop(id(config))
            if inside > 1:
                _ORIGINAL[id(config)] = (before, inside - 1)
            else:
                config._attn_implementation = before
