"""Triton kernels for weight-only int8 / int4 products with few activation rows (decode, verify).

    y (M, N) = x (M, K) @ dequant(W).T (+ bias)      few rows M; W as quant/int8.py or int4.py store it

At these sizes the product is bound by reading W, so each kernel reads W once in its stored bytes
(int8: 1 byte a weight, int4: half a byte plus its group's scale and zero), converts in registers
and accumulates in fp32. Two shapes of kernel per format:

- GEMV (M == 1, the batch-1 decode step): many small programs of ``block_n`` weight rows each, an
  elementwise fp32 accumulator reduced once at the end, so that many programs per SM keep enough
  loads in flight (what Inductor generates for ``x @ w.to(bf16).T``).
- small GEMM (1 < M <= MAX_ROWS): ``tl.dot`` over row tiles of ``block_m`` (16 at most for decode and
  verify sizes), the weight tile dequantized to the activation dtype before the product.

Codes become floats by the exponent trick, ``bits(0x4B000000 | u) = 2**23 + u``: an integer OR/add
and one float subtract, where an int-to-float conversion has a fraction of their throughput on NVIDIA
GPUs (CUDA guide, arithmetic throughput) and would compete with the loads for issue slots.
(No ``from __future__ import annotations`` here: Triton reads the ``tl.constexpr`` annotations.)

Tile sizes and launches: ``quant.triton_ops``. This module imports triton; ``quant.triton_backend``
loads it lazily.
"""

import triton
import triton.language as tl

# -- code -> float ----------------------------------------------------------------------------

@triton.jit
def _u32_to_f32(u):
    """Unsigned codes below 2**23 as exact floats: 0x4B000000 | u is the float 2**23 + u."""
    return (u | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _i8_to_f32(q):
    """int8 codes as exact floats: q + 128 is in [0, 255], so 0x4B000080 + q is the float 2**23 + 128 + q."""
    return (q.to(tl.int32) + 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0


# -- int8 -------------------------------------------------------------------------------------

@triton.jit
def int8_gemv_kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, N, K, stride_xm, stride_wn, stride_ym,
                     HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One activation row (program axis 1) against BLOCK_N weight rows (axis 0)."""
    pid_n, m = tl.program_id(0), tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)                     # (BN,)
    rk = tl.arange(0, BLOCK_K)                                       # (BK,)
    n_ok = rn < N
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + rk
        # x indexed as a (1, BK) row, like the weights: its layout then matches theirs (as in Inductor)
        x = tl.load(x_ptr + m * stride_xm + k[None, :], mask=k[None, :] < K, other=0.0).to(tl.float32)
        q = tl.load(w_ptr + rn[:, None] * stride_wn + k[None, :],
                    mask=n_ok[:, None] & (k[None, :] < K), other=0)                              # (BN, BK)
        acc += _i8_to_f32(q) * x
    y = tl.sum(acc, axis=1) * tl.load(s_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + m * stride_ym + rn, y.to(y_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def int8_gemm_kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
                     HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """BLOCK_M activation rows (axis 1) against BLOCK_N weight rows (axis 0), by tl.dot."""
    pid_n, pid_m = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok, n_ok = rm < M, rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + rk
        x = tl.load(x_ptr + rm[:, None] * stride_xm + k[None, :], mask=m_ok[:, None] & (k[None, :] < K),
                    other=0.0)                                                                    # (BM, BK)
        q = tl.load(w_ptr + rn[None, :] * stride_wn + k[:, None], mask=n_ok[None, :] & (k[:, None] < K),
                    other=0)                                                                      # (BK, BN)
        w = _i8_to_f32(q).to(x.dtype)              # exact: |q| <= 128 fits bf16/fp16's mantissa
        acc = _dot(x, w, acc, IEEE)
    acc *= tl.load(s_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    """acc + a @ b. IEEE: in full fp32, for fp32 activations (tl.dot would round them to tf32) and under
    the interpreter (its bf16 products are wrong); bf16 x bf16 products are exact in fp32 either way."""
    if IEEE:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc)


# -- int4 -------------------------------------------------------------------------------------

@triton.jit
def int4_gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, N, K, stride_xm, stride_wn, stride_sn,
                     stride_ym, HAS_BIAS: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
                     GROUPS_PER_STEP: tl.constexpr):
    """One activation row against BLOCK_N weight rows, GROUPS_PER_STEP groups a loop step.

    Per group: sum_k x_k (q_k s + z) = s * sum_k x_k q_k + z * sum_k x_k, so codes are only converted,
    never scaled one by one. Byte j of a row holds columns 2j (high nibble) and 2j + 1 (low)."""
    HALF: tl.constexpr = GROUP // 2
    pid_n, m = tl.program_id(0), tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)                     # (BN,)
    rg = tl.arange(0, GROUPS_PER_STEP)                               # (GS,)
    rh = tl.arange(0, HALF)                                          # (H,)
    n_ok = rn < N
    n_groups = K // GROUP
    acc = tl.zeros((BLOCK_N, GROUPS_PER_STEP), dtype=tl.float32)
    for g0 in range(0, n_groups, GROUPS_PER_STEP):
        g = g0 + rg
        g_ok = g < n_groups
        byte = (g[:, None] * HALF + rh[None, :])[None, :, :]              # (1, GS, H) byte column
        x_ok = g_ok[None, :, None]
        x_even = tl.load(x_ptr + m * stride_xm + 2 * byte, mask=x_ok, other=0.0).to(tl.float32)
        x_odd = tl.load(x_ptr + m * stride_xm + 2 * byte + 1, mask=x_ok, other=0.0).to(tl.float32)
        p = tl.load(w_ptr + rn[:, None, None] * stride_wn + byte,
                    mask=n_ok[:, None, None] & x_ok, other=0).to(tl.int32)                     # (BN, GS, H)
        qx = _u32_to_f32(p >> 4) * x_even + _u32_to_f32(p & 0xF) * x_odd
        sz = rn[:, None] * stride_sn + g[None, :]
        sz_ok = n_ok[:, None] & g_ok[None, :]
        s = tl.load(s_ptr + sz, mask=sz_ok, other=0.0).to(tl.float32)                       # (BN, GS)
        z = tl.load(z_ptr + sz, mask=sz_ok, other=0.0).to(tl.float32)
        acc += tl.sum(qx, axis=2) * s + z * tl.sum(x_even + x_odd, axis=2)
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + m * stride_ym + rn, y.to(y_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def int4_gemm_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_sn,
                     stride_ym, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, GROUP: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS_PER_STEP: tl.constexpr):
    """BLOCK_M activation rows against BLOCK_N weight rows by tl.dot: per group, the even and the odd
    columns (high and low nibbles) each make one product of depth GROUP / 2. The weight tile is
    dequantized as ``dequantize_int4`` does (fp32, then the activation dtype)."""
    HALF: tl.constexpr = GROUP // 2
    pid_n, pid_m = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rh = tl.arange(0, HALF)
    m_ok, n_ok = rm < M, rn < N
    n_groups = K // GROUP
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g0 in range(0, n_groups, GROUPS_PER_STEP):
        for i in tl.static_range(GROUPS_PER_STEP):
            g = g0 + i
            byte = g * HALF + rh                                                             # (H,)
            ok = byte < n_groups * HALF       # past the last group: x reads as 0, so w does not matter
            x_row = x_ptr + rm[:, None] * stride_xm + 2 * byte[None, :]
            x_even = tl.load(x_row, mask=m_ok[:, None] & ok[None, :], other=0.0)             # (BM, H)
            x_odd = tl.load(x_row + 1, mask=m_ok[:, None] & ok[None, :], other=0.0)
            p = tl.load(w_ptr + rn[None, :] * stride_wn + byte[:, None], mask=n_ok[None, :] & ok[:, None],
                        other=0).to(tl.int32)                                                # (H, BN)
            sz = rn * stride_sn + tl.minimum(g, n_groups - 1)
            s = tl.load(s_ptr + sz, mask=n_ok, other=0.0).to(tl.float32)[None, :]            # (1, BN)
            z = tl.load(z_ptr + sz, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            w_even = (_u32_to_f32(p >> 4) * s + z).to(x_even.dtype)
            w_odd = (_u32_to_f32(p & 0xF) * s + z).to(x_even.dtype)
            acc = _dot(x_even, w_even, acc, IEEE)
            acc = _dot(x_odd, w_odd, acc, IEEE)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])
