"""The ``"triton"`` backend's entry points, importing triton only when a layer first runs it.

Triton is optional (CUDA builds of torch bring it; CPU installs and CI have none), so nothing here
imports it at module import. Kernels: ``quant.triton_kernels``; launches: ``quant.triton_ops``.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

MAX_ROWS = 64   # activation rows the kernels take; more (a prefill) is compute bound: torch's matmul


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """Whether the triton package is installed (not whether a GPU is there)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter, on CPU tensors (slowly: for tests). Triton reads
    TRITON_INTERPRET when it defines a kernel, so set it before the first layer runs."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def fast_on(device: torch.device) -> bool:
    """Whether backend="auto" should consider Triton on ``device``: a CUDA device and triton."""
    return device.type == "cuda" and available()


def require() -> None:
    """Load the kernels when a layer is built (so that a traced forward finds them imported), or raise
    saying what to do where triton is missing."""
    if not available():
        raise ImportError("backend='triton' needs the triton package (CUDA builds of torch install it; "
                          "pip install triton), or use backend='auto' or 'reference'")
    from . import triton_ops  # noqa: F401


def _check(x: torch.Tensor) -> None:
    if not x.is_cuda and not interpreting():
        raise RuntimeError(f"backend='triton' runs on CUDA tensors, got a {x.device.type} input: move the model "
                           f"to CUDA, or quantize with backend='reference' (any device)")


def unit_stride(x2d: torch.Tensor) -> torch.Tensor:
    """The kernels step along a row by one element."""
    return x2d if x2d.stride(-1) == 1 else x2d.contiguous()


def int8_mm(x2d: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``(x2d @ q.T) * scales + bias`` by the Triton kernel (x2d: at most MAX_ROWS rows)."""
    _check(x2d)
    from .triton_ops import int8_mm as op

    return op(unit_stride(x2d), q, scales, bias)


def int4_mm(x2d: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
            bias: torch.Tensor | None) -> torch.Tensor:
    """``x2d @ dequantize_int4(packed, scales, zeros).T + bias`` by the Triton kernel."""
    _check(x2d)
    from .triton_ops import int4_mm as op

    return op(unit_stride(x2d), packed, scales, zeros, group_size, bias)
