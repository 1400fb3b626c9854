"""int8 weight-only quantization: symmetric, one scale per output channel.

``w ≈ q * scale[:, None]`` with ``q`` in [-127, 127]. Pure pair ``quantize_int8`` /
``dequantize_int8`` plus ``Int8Linear``, a drop-in for ``nn.Linear`` (like gpt-fast's
``WeightOnlyInt8Linear``).
"""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from . import triton_backend

BACKENDS = ("torch", "triton", "reference")


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float weight -> (q int8 (out, in), scales (out,) in w's dtype).

    Symmetric per output channel: scale = max|w_row| / 127, so |w - q*scale| <= scale/2.
    """
    scales = (w.float().abs().amax(dim=1) / 127.0).clamp(min=1e-12).to(w.dtype)  # (out,)
    q = torch.round(w.float() / scales.float()[:, None]).clamp(-128, 127).to(torch.int8)
    return q, scales


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of ``quantize_int8``: (out, in) weight of ``dtype``."""
    return (q.to(torch.float32) * scales.to(torch.float32)[:, None]).to(dtype)


def _torch_int8_mm(x2d: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return torch._weight_int8pack_mm(x2d, q, scales.to(x2d.dtype))


class Int8Linear(nn.Module):
    """``y = x @ (q * scales).T + bias`` with an int8 weight held in memory.

    backend: ``"torch"`` calls ``torch._weight_int8pack_mm`` (CPU, MPS, recent CUDA); ``"triton"``
    runs ``quant.triton_kernels`` (CUDA; inputs of up to ``MAX_ROWS`` rows, more take the reference
    path); ``"reference"`` casts the codes, matmuls, then scales each output channel (any device).
    """

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None,
                 backend: str = "reference"):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"Int8Linear backend must be one of {BACKENDS}, got {backend!r}")
        if backend == "triton":
            triton_backend.require()
        self.out_features, self.in_features = q.shape
        self.backend = backend
        self.register_buffer("weight", q)  # (out, in) int8
        self.register_buffer("scales", scales)  # (out,)
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, backend: str = "reference") -> "Int8Linear":
        q, scales = quantize_int8(linear.weight.detach())
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(q, scales, bias, backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2d = x.reshape(-1, self.in_features)
        if self.backend == "triton" and x2d.shape[0] <= triton_backend.MAX_ROWS:
            y = triton_backend.int8_mm(x2d, self.weight, self.scales, self.bias)  # bias added in the kernel
            return y.reshape(*x.shape[:-1], self.out_features)
        if self.backend == "torch":
            y = _torch_int8_mm(x2d, self.weight, self.scales).reshape(*x.shape[:-1], self.out_features)
            return y if self.bias is None else y + self.bias
        y = F.linear(x, self.weight.to(x.dtype)) * self.scales.to(x.dtype)  # per-channel scale on the output
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, backend={self.backend}"
