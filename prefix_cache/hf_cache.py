"""The only Hugging Face-aware part: K/V lists to and from a transformers ``DynamicCache``.

Only caches of plain per-layer full-attention K/V can be cut into reusable blocks:
sliding-window and chunked layers drop old positions, recurrent (mamba, linear
attention) layers keep a state that is not per token, and encoder-decoder models
cache cross-attention over a different sequence.
"""

from __future__ import annotations

from typing import Any

from transformers.cache_utils import DynamicCache, DynamicLayer

from .store import KV

# Model types whose layers (some or all) keep recurrent state rather than per-token K/V,
# for configs that do not say so in `layer_types`.
_RECURRENT_MODEL_TYPES = frozenset({
    "mamba", "mamba2", "falcon_mamba", "rwkv", "xlstm", "recurrent_gemma", "jamba", "zamba",
    "zamba2", "bamba", "falcon_h1", "granitemoehybrid", "nemotron_h", "lfm2", "lfm2_moe",
    "qwen3_next", "minimax", "plamo2", "hunyuan_v1_moe_hybrid",
})


def check_supported(config: Any) -> None:
    """Raise ValueError unless every decoder layer of ``config`` caches full-attention K/V."""
    model_type = getattr(config, "model_type", type(config).__name__)
    if getattr(config, "is_encoder_decoder", False):
        _refuse(model_type, "is an encoder-decoder model (its cache also holds cross-attention K/V)")
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    model_type = getattr(text, "model_type", model_type) or model_type
    if model_type in _RECURRENT_MODEL_TYPES:
        _refuse(model_type, "has recurrent (mamba / linear-attention) layers with no per-token K/V")
    layer_types = getattr(text, "layer_types", None)
    if layer_types is not None:
        other = sorted(set(layer_types) - {"full_attention"})
        if other:
            _refuse(model_type, f"has layers of type {other}; only 'full_attention' layers can be reused")
    else:
        if getattr(text, "sliding_window", None) is not None:
            _refuse(model_type, f"uses sliding-window attention (sliding_window={text.sliding_window}), "
                                "whose cache drops old positions")
        if getattr(text, "attention_chunk_size", None) is not None:
            _refuse(model_type, "uses chunked attention, whose cache drops old positions")
    if getattr(text, "kv_sharing_modes", None) or getattr(text, "num_kv_shared_layers", 0):
        _refuse(model_type, "shares K/V between layers")


def kv_from_cache(cache: Any, row: int = 0) -> KV:
    """Per layer (key, value) of batch row ``row``, each (1, heads, T, head_dim) (views, not copies).

    ``cache`` is a transformers ``DynamicCache`` of full-attention layers (what ``model(...)``
    returns as ``past_key_values``). Position t of the result must belong to token t of the
    ids you insert, so use caches of unpadded (or right-padded) rows.
    """
    layers = getattr(cache, "layers", None)
    if layers is None or hasattr(cache, "cross_attention_cache"):
        raise ValueError(f"kv_from_cache reads a transformers DynamicCache of a decoder-only model, "
                         f"got {type(cache).__name__}")
    kv = []
    for i, layer in enumerate(layers):
        if type(layer) is not DynamicLayer or layer.keys is None or layer.keys.dim() != 4:
            raise ValueError(f"layer {i} of the cache is a {type(layer).__name__} (initialized: "
                             f"{getattr(layer, 'is_initialized', '?')}); the prefix cache needs plain "
                             "full-attention DynamicLayer K/V (no sliding-window, quantized or recurrent layers)")
        if not 0 <= row < layer.keys.shape[0]:
            raise ValueError(f"row {row} out of range for a cache of batch size {layer.keys.shape[0]}")
        if layer.keys.shape[0] == 1:                                       # batch 1: the tensors themselves
            kv.append((layer.keys, layer.values))
        else:
            kv.append((layer.keys[row:row + 1], layer.values[row:row + 1]))   # (1, heads, T, head_dim)
    return kv


def _check_layer_count(kv_layers: KV, config: Any) -> None:
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    num_layers = getattr(text, "num_hidden_layers", len(kv_layers))
    if kv_layers and len(kv_layers) != num_layers:
        raise ValueError(f"got K/V for {len(kv_layers)} layers but the model has {num_layers}; "
                         "was the prefix cached from another model? Use one namespace per model")


def cache_from_kv(kv_layers: KV, config: Any) -> DynamicCache:
    """A ``DynamicCache`` holding ``kv_layers`` (copied), ready for ``model(..., past_key_values=cache)``
    (``cache=cache`` in transformers 5.2x)."""
    check_supported(config)
    _check_layer_count(kv_layers, config)
    cache = _new_dynamic_cache(config)
    for i, (k, v) in enumerate(kv_layers):
        cache.update(k, v, i)          # DynamicLayer.update concatenates, so the cache owns a copy
    return cache


def cache_with_kv(kv_layers: KV, config: Any, cache: DynamicCache | None = None) -> DynamicCache:
    """A ``DynamicCache`` that takes ``kv_layers`` as they are (no copy): the caller hands over
    tensors it will not touch again, e.g. the views ``PrefixMatch.kv()`` returns. Later updates
    concatenate, so the cache never writes into them. ``cache``: an empty ``DynamicCache`` to fill
    instead of a new one (building one reads the config layer by layer: not free for deep models)."""
    _check_layer_count(kv_layers, config)
    if cache is None or not _empty_dynamic(cache, len(kv_layers)):
        cache = _new_dynamic_cache(config)
    layers = getattr(cache, "layers", None)
    if layers is None or len(layers) != len(kv_layers) or any(type(x) is not DynamicLayer for x in layers):
        for i, (k, v) in enumerate(kv_layers):
            cache.update(k, v, i)      # unusual cache structure: the copying path
        return cache
    for layer, (k, v) in zip(layers, kv_layers):
        layer.dtype, layer.device = k.dtype, k.device    # what DynamicLayer.lazy_initialization sets
        layer.keys, layer.values, layer.is_initialized = k, v, True
    return cache


def _empty_dynamic(cache: Any, num_layers: int) -> bool:
    """Whether ``cache`` is a ``DynamicCache`` of ``num_layers`` plain layers holding nothing yet."""
    layers = getattr(cache, "layers", None)
    return (type(cache) is DynamicCache and layers is not None and len(layers) == num_layers
            and all(type(x) is DynamicLayer and not x.is_initialized for x in layers))


def _new_dynamic_cache(config: Any) -> DynamicCache:
    """An empty DynamicCache; passes ``config`` where the constructor accepts it."""
    try:
        return DynamicCache(config=config)
    except TypeError:                  # constructors without a `config` keyword
        return DynamicCache()


def _refuse(model_type: str, why: str) -> None:
    raise ValueError(f"prefix_cache cannot reuse the cache of model type '{model_type}': it {why}. "
                     "Run this model without a prefix cache (prefix_cache=None).")


__all__ = ["cache_from_kv", "cache_with_kv", "check_supported", "kv_from_cache"]
