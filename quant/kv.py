"""A KIVI-style quantized KV cache for Hugging Face transformers (>= 5.17).

Keys are quantized per channel (one scale/zero per channel over each group of ``group_size``
tokens), values per token (one scale/zero per token and head), both asymmetric with 8 or 4
bits (4-bit codes packed two per byte along the head dim). The most recent
``residual_length`` tokens (up to ``residual_length + group_size - 1``) stay in full precision,
so cropping back into them (speculative decoding's rollback) is exact.
(Liu et al. 2024, "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache".)
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from .int4 import pack_int4, unpack_int4


class QTensor(NamedTuple):
    """Codes (uint8; packed pairs when 4-bit) with the scale/zero that decode them: x ≈ q*scale + zero."""

    data: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor


def _quantize(x: torch.Tensor, dim: int, bits: int) -> QTensor:
    """Asymmetric quantization of ``x`` with one (scale, zero) per slice reduced along ``dim``."""
    xf = x.float()
    lo, hi = xf.amin(dim=dim, keepdim=True), xf.amax(dim=dim, keepdim=True)
    scale = ((hi - lo) / (2**bits - 1)).clamp(min=1e-8).to(x.dtype)
    zero = lo.to(x.dtype)
    q = torch.round((xf - zero.float()) / scale.float()).clamp(0, 2**bits - 1).to(torch.uint8)
    return QTensor(pack_int4(q) if bits == 4 else q, scale, zero)


def _codes(data: torch.Tensor, bits: int) -> torch.Tensor:
    return unpack_int4(data) if bits == 4 else data


def quantize_per_token(v: torch.Tensor, bits: int) -> QTensor:
    """(B, H, T, D) -> codes (B, H, T, D or D/2), scale/zero (B, H, T, 1)."""
    return _quantize(v, dim=-1, bits=bits)


def dequantize_per_token(qt: QTensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of ``quantize_per_token``: (B, H, T, D)."""
    return (_codes(qt.data, bits).float() * qt.scale.float() + qt.zero.float()).to(dtype)


def quantize_per_channel(k: torch.Tensor, bits: int, group_size: int) -> QTensor:
    """(B, H, T, D), T a multiple of group_size -> codes (B, H, T, D or D/2), scale/zero (B, H, T/G, D)."""
    B, H, T, D = k.shape
    qt = _quantize(k.reshape(B, H, T // group_size, group_size, D), dim=-2, bits=bits)  # scale (B,H,n,1,D)
    return QTensor(qt.data.reshape(B, H, T, -1), qt.scale.squeeze(-2), qt.zero.squeeze(-2))


def dequantize_per_channel(qt: QTensor, bits: int, group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of ``quantize_per_channel``: (B, H, T, D)."""
    B, H, T, _ = qt.data.shape
    codes = _codes(qt.data, bits).float().reshape(B, H, T // group_size, group_size, -1)
    k = codes * qt.scale.float().unsqueeze(-2) + qt.zero.float().unsqueeze(-2)
    return k.reshape(B, H, T, -1).to(dtype)


def quantize_token_groups(x: torch.Tensor, bits: int, group: int = 32) -> QTensor:
    """(B, H, n, D) -> codes (B, H, n, D or D/2), scale/zero (B, H, n, D/group): one (scale, zero)
    per token, head and ``group`` channels (the whole head if ``group`` does not divide D).

    Each token is quantized on its own, when it is written: what a static (preallocated,
    position-indexed) cache needs, where KIVI's per-channel key groups would wait for whole
    token groups. Small channel groups keep a few outlier key channels from costing the rest.
    """
    B, H, n, D = x.shape
    g = group if D % group == 0 else D
    qt = _quantize(x.reshape(B, H, n, D // g, g), dim=-1, bits=bits)
    return QTensor(qt.data.reshape(B, H, n, -1), qt.scale.squeeze(-1), qt.zero.squeeze(-1))


def dequantize_token_groups(qt: QTensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of ``quantize_token_groups``: (B, H, n, D)."""
    B, H, n, _ = qt.data.shape
    codes = _codes(qt.data, bits).float().reshape(B, H, n, qt.scale.shape[-1], -1)
    x = codes * qt.scale.float().unsqueeze(-1) + qt.zero.float().unsqueeze(-1)
    return x.reshape(B, H, n, -1).to(dtype)


def _cat(a: QTensor | None, b: QTensor) -> QTensor:
    return b if a is None else QTensor(*(torch.cat([x, y], dim=2) for x, y in zip(a, b)))


def _map(qt: QTensor | None, fn) -> QTensor | None:
    return None if qt is None else QTensor(*(fn(t) for t in qt))


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class QuantizedKVLayer(DynamicLayer):
    """One layer's cache: quantized past (``qkeys``/``qvalues``) + full-precision residual (``keys``/``values``).

    ``keys``/``values`` hold only the residual window; ``update`` returns the whole sequence.
    """

    def __init__(self, bits: int = 8, residual_length: int = 64, group_size: int = 64):
        super().__init__()
        self.bits, self.residual_length, self.group_size = bits, residual_length, group_size
        self.qkeys: QTensor | None = None  # (B, H, Tq, D'), scales (B, H, Tq/G, D)
        self.qvalues: QTensor | None = None  # (B, H, Tq, D'), scales (B, H, Tq, 1)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys, self.values = key_states[..., :0, :], value_states[..., :0, :]
        self.is_initialized = True

    @property
    def quantized_length(self) -> int:
        return 0 if self.qkeys is None else self.qkeys.data.shape[-2]

    def get_seq_length(self) -> int:
        return 0 if not self.is_initialized else self.quantized_length + self.keys.shape[-2]

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole (B, H, T, D) keys and values: dequantized past + residual."""
        if self.qkeys is None:
            return self.keys, self.values
        k = dequantize_per_channel(self.qkeys, self.bits, self.group_size, self.dtype)
        v = dequantize_per_token(self.qvalues, self.bits, self.dtype)
        return torch.cat([k, self.keys], dim=-2), torch.cat([v, self.values], dim=-2)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        full = self.dequantized()
        self._flush()
        return full

    def _flush(self) -> None:
        """Quantize the oldest whole groups of the residual while >= residual_length tokens remain."""
        n = (self.keys.shape[-2] - self.residual_length) // self.group_size * self.group_size
        if n <= 0:
            return
        k, v = self.keys[..., :n, :], self.values[..., :n, :]
        self.qkeys = _cat(self.qkeys, quantize_per_channel(k, self.bits, self.group_size))
        self.qvalues = _cat(self.qvalues, quantize_per_token(v, self.bits))
        self.keys, self.values = self.keys[..., n:, :].clone(), self.values[..., n:, :].clone()

    def crop(self, tokens_to_remove: int) -> None:
        """Negative: drop that many tokens (transformers >= 5.17); positive: keep that many (legacy)."""
        if not self.is_initialized or tokens_to_remove == 0:
            return
        total = self.get_seq_length()
        keep = max(total + tokens_to_remove, 0) if tokens_to_remove < 0 else min(tokens_to_remove, total)
        qlen = self.quantized_length
        if keep >= qlen:  # inside the residual window: exact
            self.keys, self.values = self.keys[..., : keep - qlen, :], self.values[..., : keep - qlen, :]
            return
        # into the quantized past: keep whole groups; the kept part of a cut group comes back dequantized
        G, qk, qv = self.group_size, self.qkeys, self.qvalues
        whole, groups = keep // G * G, keep // G
        cut_k = QTensor(qk.data[:, :, whole:whole + G], qk.scale[:, :, groups:groups + 1], qk.zero[:, :, groups:groups + 1])
        self.keys = dequantize_per_channel(cut_k, self.bits, G, self.dtype)[..., : keep - whole, :].clone()
        self.values = dequantize_per_token(_map(qv, lambda t: t[:, :, whole:keep]), self.bits, self.dtype).clone()
        self.qkeys = None if whole == 0 else QTensor(qk.data[:, :, :whole].clone(), qk.scale[:, :, :groups].clone(),
                                                     qk.zero[:, :, :groups].clone())
        self.qvalues = None if whole == 0 else _map(qv, lambda t: t[:, :, :whole].clone())

    def _map_batch(self, fn) -> None:
        if self.is_initialized:
            self.keys, self.values = fn(self.keys), fn(self.values)
            self.qkeys, self.qvalues = _map(self.qkeys, fn), _map(self.qvalues, fn)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices, ...])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def reset(self) -> None:
        self.keys = self.values = self.qkeys = self.qvalues = None
        self.is_initialized = False

    def nbytes(self) -> int:
        if not self.is_initialized:
            return 0
        return _nbytes(self.keys, self.values, *(self.qkeys or ()), *(self.qvalues or ()))


class QuantizedKVCache(DynamicCache):
    """KIVI-quantized drop-in for ``DynamicCache``: ``model(..., past_key_values=QuantizedKVCache(config))``
    (``cache=`` in transformers 5.2x, where ``past_key_values`` is a deprecated alias).

    bits: 8 or 4. residual_length: recent tokens kept in full precision (>= 0). group_size:
    tokens per key scale group; the residual holds up to ``residual_length + group_size - 1``.
    Supports crop (negative = tokens to drop), batch_select_indices, reorder_cache; ``nbytes()``.
    """

    def __init__(self, config, bits: int = 8, residual_length: int = 64, group_size: int = 64):
        if bits not in (4, 8):
            raise ValueError(f"QuantizedKVCache bits must be 8 or 4, got {bits!r}")
        if group_size < 1 or residual_length < 0:
            raise ValueError(f"need group_size >= 1 and residual_length >= 0, got {group_size}, {residual_length}")
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        kinds = set(getattr(text, "layer_types", None) or ["full_attention"])
        if kinds - {"full_attention"}:
            raise ValueError(f"QuantizedKVCache supports full-attention layers only; this model has {sorted(kinds)}")
        self.bits, self.residual_length, self.group_size = bits, residual_length, group_size
        layers = [QuantizedKVLayer(bits, residual_length, group_size) for _ in range(text.num_hidden_layers)]
        Cache.__init__(self, layers=layers)

    def __iter__(self):
        for layer in self.layers:
            yield (*layer.dequantized(), None) if layer.is_initialized else (None, None, None)

    def nbytes(self) -> int:
        """Bytes held now by all layers (codes, scales, zeros and the full-precision residual)."""
        return sum(layer.nbytes() for layer in self.layers)
