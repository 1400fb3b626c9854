"""The one place that knows how to call a Hugging Face causal LM.

The decode loop sees a model as: "run these tokens at these positions over this
cache under this key mask, give me logits", plus cache crop / row selection. Every
architecture difference (cache classes, ``logits_to_keep`` support, crop's signature
across transformers versions) is absorbed here, so the loop has no per-model cases.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from specdec.layers import find_layer_list


def accepts(model: torch.nn.Module, name: str) -> bool:
    """Whether ``model.forward`` takes a keyword ``name``."""
    return name in inspect.signature(model.forward).parameters


def cache_keyword(model: torch.nn.Module) -> str | None:
    """The forward keyword that takes the KV cache: ``cache`` in newer transformers (5.2x, where
    ``past_key_values`` is a deprecated alias), ``past_key_values`` before; None if neither."""
    for forward in (model.forward, type(model).forward):  # the class's, when a wrapper hides the instance's
        params = inspect.signature(forward).parameters
        found = next((name for name in ("cache", "past_key_values") if name in params), None)
        if found:
            return found
    return None


@dataclass
class ModelRunner:
    """Wraps an HF causal LM for slot-indexed decoding.

    Slots are cache columns: every row of a batch shares the slot index, rows differ
    only in which slots their key mask enables (left padding, rejected drafts).
    """

    model: torch.nn.Module
    make_cache: object = None  # callable(model) -> Cache; default DynamicCache(config=...)
    _has_logits_to_keep: bool = field(init=False, default=False)
    _cache_keyword: str = field(init=False, default="past_key_values")
    _features: torch.Tensor | None = field(init=False, default=None, repr=False)

    def __post_init__(self):
        config = self.model.config
        if getattr(config, "is_encoder_decoder", False):
            raise ValueError(f"{type(self.model).__name__} is an encoder-decoder model; specdec decodes "
                             "decoder-only causal LMs (AutoModelForCausalLM)")
        self._has_logits_to_keep = accepts(self.model, "logits_to_keep")
        self._cache_keyword = cache_keyword(self.model) or "past_key_values"

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def vocab_size(self) -> int:
        return self.model.get_output_embeddings().weight.shape[0]

    def new_cache(self):
        if self.make_cache is not None:
            return self.make_cache(self.model)
        from transformers import DynamicCache

        try:
            return DynamicCache(config=self.model.config)
        except TypeError:  # older signature
            return DynamicCache()

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, key_mask: torch.Tensor, positions: torch.Tensor,
                cache, last_only: bool = False) -> torch.Tensor:
        """Logits (B, n, V) for ``tokens`` (B, n) placed in the next n slots of ``cache``.

        key_mask: (B, slots_before + n) 1 where a slot holds a real token of that row.
        positions: (B, n) each token's position within its own row.
        """
        kwargs = {}
        if last_only and self._has_logits_to_keep:
            kwargs["logits_to_keep"] = 1
        out = self.model(input_ids=tokens.to(self.device), attention_mask=key_mask.to(self.device),
                         position_ids=positions.to(self.device), use_cache=True,
                         **{self._cache_keyword: cache}, **kwargs)
        logits = out.logits[:, -1:] if last_only else out.logits
        return logits.to(self.device)  # a model split over devices (device_map) ends elsewhere

    @contextmanager
    def watching_features(self):
        """Inside: each forward keeps its last decoder layer's output at every position (read it
        with ``take_features``), whatever ``last_only`` asked of the logits. The hook is removed on exit."""
        handle = hook_last_layer(self.model, self._keep_features)
        try:
            yield self
        finally:
            handle.remove()
            self._features = None

    def _keep_features(self, hidden: torch.Tensor) -> None:
        self._features = hidden

    def take_features(self) -> torch.Tensor:
        """(B, n, H) the latest forward's last-layer outputs (before the final norm); once."""
        features, self._features = self._features, None
        if features is None:
            raise RuntimeError("no features kept: run forward() inside ModelRunner.watching_features()")
        return features


def cache_length(cache) -> int:
    return int(cache.get_seq_length()) if cache is not None else 0


def crop(cache, length: int) -> None:
    """Keep the first ``length`` slots. Negative argument = tokens to drop: the one form
    every transformers version accepts (5.2x refuses a positive absolute length)."""
    drop = cache_length(cache) - length
    if drop > 0:
        cache.crop(-drop)


def select_rows(cache, rows: torch.Tensor) -> None:
    """Keep only these batch rows (finished rows stop costing work). An empty HF cache holds no
    rows yet (its first forward brings the active rows only); a static cache always holds its
    fixed rows and must learn which stay active, empty or not."""
    from transformers import Cache

    if isinstance(cache, Cache) and cache_length(cache) == 0:
        return
    cache.batch_select_indices(rows)


def hook_last_layer(model: torch.nn.Module, keep) -> torch.utils.hooks.RemovableHandle:
    """A forward hook on ``model``'s last decoder layer that hands ``keep`` its output (B, n, H) at
    every position (the features a feature draft reads); remove it with the returned handle."""
    def hook(module, args, output) -> None:
        keep(output[0] if isinstance(output, tuple) else output)

    return find_layer_list(model)[1][-1].register_forward_hook(hook)
