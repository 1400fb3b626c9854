"""int4 weight-only quantization: asymmetric, one (scale, zero) per group along the input dim.

Canonical format (independent of any kernel):
    packed (out, in // 2) uint8   two 4-bit codes per byte, even column in the high nibble
    scales (out, in // group_size) and zeros (same shape), in the weight's dtype
    w ≈ q * scale + zero          q in [0, 15]; zero is the value code 0 decodes to (the group min)
``Int4Linear`` converts this once, at construction, into what its backend's kernel wants.
"""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from . import triton_backend

BACKENDS = ("tinygemm", "triton", "reference")
GROUP_SIZES = (32, 64, 128, 256)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(..., 2n) codes in [0, 15] -> (..., n) uint8; even index in the high nibble."""
    q = q.to(torch.uint8)
    return (q[..., ::2] << 4) | q[..., 1::2]


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of ``pack_int4``: (..., n) uint8 -> (..., 2n) uint8 codes."""
    return torch.stack([packed >> 4, packed & 0xF], dim=-1).flatten(-2)


def quantize_int4(w: torch.Tensor, group_size: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, in) float weight -> (packed, scales, zeros) in the canonical format above.

    Per group: scale = (max - min) / 15, zero = min, q = round((w - zero) / scale), so
    |w - (q * scale + zero)| <= scale / 2 (exactly so for fp32 weights).
    """
    out_f, in_f = w.shape
    if in_f % group_size:
        raise ValueError(f"in_features={in_f} is not divisible by group_size={group_size}")
    g = w.float().reshape(out_f, in_f // group_size, group_size)  # (out, n_groups, G)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    scales = ((hi - lo) / 15.0).clamp(min=1e-10).to(w.dtype)  # stored dtype first, then q from it
    zeros = lo.to(w.dtype)
    q = torch.round((g - zeros.float()[..., None]) / scales.float()[..., None]).clamp(0, 15)
    return pack_int4(q.reshape(out_f, in_f)), scales, zeros


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of ``quantize_int4``: (out, in) weight of ``dtype``."""
    out_f, n_groups = scales.shape
    q = unpack_int4(packed).float().reshape(out_f, n_groups, -1)  # (out, n_groups, G)
    w = q * scales.float()[..., None] + zeros.float()[..., None]
    return w.reshape(out_f, -1).to(dtype)


def _inner_k_tiles(in_features: int) -> int:
    return next((t for t in (8, 4, 2) if in_features % (t * 16) == 0), 2)


def to_tinygemm(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Canonical -> (kernel weight, scales_and_zeros (n_groups, out, 2)) for the device of ``packed``.

    tinygemm decodes ``(q - 8) * scale + zero``, hence its zero is ours + 8 * scale. CUDA's
    converter takes packed uint8 (torch >= 2.5; int32 codes before); CPU's takes int32 codes.
    """
    in_f = packed.shape[1] * 2
    tiles = _inner_k_tiles(in_f)
    if packed.device.type == "cuda":
        try:
            weight = torch._convert_weight_to_int4pack(packed.contiguous(), tiles)
        except RuntimeError:  # older signature: int32 codes (out, in)
            weight = torch._convert_weight_to_int4pack(unpack_int4(packed).to(torch.int32).contiguous(), tiles)
    else:
        weight = torch._convert_weight_to_int4pack_for_cpu(unpack_int4(packed).to(torch.int32).contiguous(), tiles)
    tg_zeros = zeros.float() + 8.0 * scales.float()
    scales_and_zeros = torch.stack([scales.float(), tg_zeros], dim=-1).transpose(0, 1).contiguous()
    return weight, scales_and_zeros.to(dtype)  # (n_groups, out, 2)


def _tinygemm_mm(x2d: torch.Tensor, weight: torch.Tensor, group_size: int, sz: torch.Tensor) -> torch.Tensor:
    if x2d.device.type == "cuda":
        return torch._weight_int4pack_mm(x2d.contiguous(), weight, group_size, sz)
    return torch._weight_int4pack_mm_for_cpu(x2d.contiguous(), weight, group_size, sz)


class Int4Linear(nn.Module):
    """Group-wise int4 weight-only linear.

    backend: ``"tinygemm"`` uses ``torch._weight_int4pack_mm`` (CUDA, bf16 activations) or
    ``torch._weight_int4pack_mm_for_cpu`` (CPU); the kernel layout is device-specific, so build
    the module on the device it will run on. ``"triton"`` keeps the canonical buffers and runs
    ``quant.triton_kernels`` (CUDA; inputs of up to ``MAX_ROWS`` rows, more take the reference path).
    ``"reference"`` keeps the canonical buffers and dequantizes then matmuls (any device, any dtype).
    """

    def __init__(self, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                 bias: torch.Tensor | None = None, backend: str = "reference"):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"Int4Linear backend must be one of {BACKENDS}, got {backend!r}")
        if backend == "triton":
            triton_backend.require()
        self.out_features, self.in_features = packed.shape[0], packed.shape[1] * 2
        self.group_size, self.backend = group_size, backend
        if backend == "tinygemm":  # CUDA's kernel wants bf16 activations and scales
            sz_dtype = torch.bfloat16 if packed.device.type == "cuda" else scales.dtype
            weight, sz = to_tinygemm(packed, scales, zeros, sz_dtype)
            self.register_buffer("weight", weight)
            self.register_buffer("scales_and_zeros", sz)  # (n_groups, out, 2)
        else:
            self.register_buffer("weight", packed)  # (out, in // 2) uint8
            self.register_buffer("scales", scales)  # (out, n_groups)
            self.register_buffer("zeros", zeros)
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 64, backend: str = "reference") -> "Int4Linear":
        packed, scales, zeros = quantize_int4(linear.weight.detach(), group_size)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(packed, scales, zeros, group_size, bias, backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "tinygemm":
            x2d = x.reshape(-1, self.in_features).to(self.scales_and_zeros.dtype)
            y = _tinygemm_mm(x2d, self.weight, self.group_size, self.scales_and_zeros)
            y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
            return y if self.bias is None else y + self.bias
        x2d = x.reshape(-1, self.in_features)
        if self.backend == "triton" and x2d.shape[0] <= triton_backend.MAX_ROWS:
            y = triton_backend.int4_mm(x2d, self.weight, self.scales, self.zeros, self.group_size, self.bias)
            return y.reshape(*x.shape[:-1], self.out_features)
        w = dequantize_int4(self.weight, self.scales, self.zeros, x.dtype)
        return F.linear(x, w, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"group_size={self.group_size}, backend={self.backend}")
