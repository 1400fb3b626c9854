"""Launching the Triton weight-only kernels (``quant.triton_kernels``): tile sizes, grids, custom ops.

``int8_mm`` / ``int4_mm`` are ``torch.library`` custom ops over 2D activations of at most
``MAX_ROWS`` rows: ``torch.compile`` sees them as opaque calls (their Python launch code is not
traced), and CUDA graphs capture the kernel launches once a warm-up call has compiled them.
``int8_linear`` / ``int4_linear`` take an explicit ``KernelConfig``, for benchmarks and sweeps.

The tile sizes (``int8_config`` / ``int4_config``) are starting points for memory-bound products on
a GPU of ~100+ SMs, where what counts is the weight bytes in flight per SM (tens of KB hide the
memory latency). GEMV: a step of 4 KB (4 rows x 1 KB), one 16-byte load per thread of 8 warps and
few registers, so that all of a layer's programs fit on the SMs at once. GEMM: 4 KB weight tiles
pipelined 4 deep. ``benchmarks/quant_kernels.py`` times alternatives on the device at hand.
(No ``from __future__ import annotations``: ``torch.library`` reads the ops' annotations.)
"""

import functools
from dataclasses import dataclass
from typing import Optional

import torch
import triton

from . import triton_kernels as kernels
from .triton_backend import MAX_ROWS, interpreting

__all__ = ["MAX_ROWS", "KernelConfig", "int8_config", "int4_config", "int8_linear", "int4_linear", "int8_mm",
           "int4_mm"]


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch settings of one kernel call (block sizes are powers of two)."""

    block_m: int          # activation rows per program; 1 selects the GEMV kernel
    block_n: int          # weight rows (output features) per program
    block_k: int          # input features per loop step (int4: a multiple of the group size)
    num_warps: int = 4
    num_stages: int = 3


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 132  # the interpreter (CPU tensors): any plausible value gives the same results
    return torch.cuda.get_device_properties(device).multi_processor_count


def _block_m(m: int) -> int:
    return min(64, max(16, triton.next_power_of_2(m)))


def _block_n(n: int, device: torch.device, gemv: bool) -> int:
    """Wide tiles only where the output has rows enough for several programs per SM."""
    if gemv:
        return 8 if n >= 8 * 4 * _sm_count(device) else 4
    return 32 if n >= 32 * 2 * _sm_count(device) else 16


def int8_config(m: int, n: int, k: int, device: torch.device) -> KernelConfig:
    """Tile sizes for an (m, k) x (n, k)^T int8 product."""
    if m == 1:
        return KernelConfig(1, _block_n(n, device, True), min(1024, triton.next_power_of_2(k)), 8, 2)
    return KernelConfig(_block_m(m), _block_n(n, device, False), max(16, min(256, triton.next_power_of_2(k))), 4, 4)


def int4_config(m: int, n: int, k: int, group_size: int, device: torch.device) -> KernelConfig:
    """Tile sizes for an int4 product; ``block_k`` is a whole number of groups (at most the row)."""
    groups = triton.next_power_of_2(k // group_size)
    if m == 1:   # 2048 codes: 1 KB a row, as int8's step
        return KernelConfig(1, _block_n(n, device, True), group_size * min(groups, max(1, 2048 // group_size)), 8, 2)
    return KernelConfig(_block_m(m), _block_n(n, device, False), group_size * min(groups, max(1, 256 // group_size)), 4, 4)


def _ieee(x: torch.Tensor) -> bool:
    return x.dtype == torch.float32 or interpreting()


def _output(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The (M, N) result; the kernels index in int32, so no operand may hold 2**31 elements."""
    if max(x.numel(), weight.numel()) >= 2**31:
        raise ValueError(f"the Triton kernels index with int32: weight {tuple(weight.shape)} or input "
                         f"{tuple(x.shape)} is too large; use backend='reference' for this layer")
    return torch.empty((x.shape[0], weight.shape[0]), dtype=x.dtype, device=x.device)


def int8_linear(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, bias: Optional[torch.Tensor] = None,
                config: Optional[KernelConfig] = None) -> torch.Tensor:
    """``(x @ q.T) * scales + bias`` for x (M, K) with unit stride along K, q (N, K) int8 contiguous."""
    (m, k), n = x.shape, q.shape[0]
    c = config or int8_config(m, n, k, x.device)
    y = _output(x, q)
    b = scales if bias is None else bias  # a valid pointer the kernel never reads
    launch = dict(HAS_BIAS=bias is not None, BLOCK_N=c.block_n, BLOCK_K=c.block_k, num_warps=c.num_warps,
                  num_stages=c.num_stages)
    if c.block_m == 1:
        kernels.int8_gemv_kernel[(triton.cdiv(n, c.block_n), m)](
            x, q, scales, b, y, n, k, x.stride(0), q.stride(0), y.stride(0), **launch)
    else:
        kernels.int8_gemm_kernel[(triton.cdiv(n, c.block_n), triton.cdiv(m, c.block_m))](
            x, q, scales, b, y, m, n, k, x.stride(0), q.stride(0), y.stride(0),
            IEEE=_ieee(x), BLOCK_M=c.block_m, **launch)
    return y


def int4_linear(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                bias: Optional[torch.Tensor] = None, config: Optional[KernelConfig] = None) -> torch.Tensor:
    """``x @ dequantize_int4(packed, scales, zeros).T + bias``, canonical int4 buffers, contiguous."""
    (m, k), n = x.shape, packed.shape[0]
    c = config or int4_config(m, n, k, group_size, x.device)
    y = _output(x, packed)
    b = scales if bias is None else bias
    launch = dict(HAS_BIAS=bias is not None, GROUP=group_size, BLOCK_N=c.block_n,
                  GROUPS_PER_STEP=c.block_k // group_size, num_warps=c.num_warps, num_stages=c.num_stages)
    strides = (x.stride(0), packed.stride(0), scales.stride(0), y.stride(0))
    if c.block_m == 1:
        kernels.int4_gemv_kernel[(triton.cdiv(n, c.block_n), m)](
            x, packed, scales, zeros, b, y, n, k, *strides, **launch)
    else:
        kernels.int4_gemm_kernel[(triton.cdiv(n, c.block_n), triton.cdiv(m, c.block_m))](
            x, packed, scales, zeros, b, y, m, n, k, *strides, IEEE=_ieee(x),
            BLOCK_M=c.block_m, **launch)
    return y


@torch.library.custom_op("specdec_quant::int8_mm", mutates_args=())
def int8_mm(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``int8_linear`` with the default tile sizes, as an op ``torch.compile`` does not trace into."""
    return int8_linear(x, q, scales, bias)


@int8_mm.register_fake
def _int8_mm_fake(x, q, scales, bias):
    return x.new_empty((x.shape[0], q.shape[0]))


@torch.library.custom_op("specdec_quant::int4_mm", mutates_args=())
def int4_mm(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
            bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``int4_linear`` with the default tile sizes, as an op ``torch.compile`` does not trace into."""
    return int4_linear(x, packed, scales, zeros, group_size, bias)


@int4_mm.register_fake
def _int4_mm_fake(x, packed, scales, zeros, group_size, bias):
    return x.new_empty((x.shape[0], packed.shape[0]))
