"""Round trips, packing and the quantized Linear layers (CPU)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from quant import Int4Linear, Int8Linear, dequantize_int4, dequantize_int8, quantize_int4, quantize_int8
from quant.int4 import pack_int4, unpack_int4

EPS = 1e-6


def _w(out_f: int, in_f: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(out_f, in_f, generator=g) * torch.rand(out_f, 1, generator=g) * 3).to(dtype)


@settings(max_examples=30, deadline=None)
@given(out_f=st.integers(1, 40), in_f=st.integers(1, 70), seed=st.integers(0, 2**16))
def test_int8_round_trip_within_half_scale(out_f, in_f, seed):
    w = _w(out_f, in_f, seed)
    q, scales = quantize_int8(w)
    assert q.dtype == torch.int8 and q.shape == w.shape and scales.shape == (out_f,)
    err = (dequantize_int8(q, scales) - w).abs()
    assert (err <= scales[:, None] / 2 * (1 + EPS) + EPS).all()


@settings(max_examples=30, deadline=None)
@given(out_f=st.integers(1, 24), n_groups=st.integers(1, 4), group=st.sampled_from([32, 64, 128]),
       seed=st.integers(0, 2**16))
def test_int4_round_trip_within_half_scale_per_group(out_f, n_groups, group, seed):
    w = _w(out_f, n_groups * group, seed)
    packed, scales, zeros = quantize_int4(w, group)
    assert packed.dtype == torch.uint8 and packed.shape == (out_f, n_groups * group // 2)
    assert scales.shape == zeros.shape == (out_f, n_groups)
    err = (dequantize_int4(packed, scales, zeros) - w).abs().reshape(out_f, n_groups, group)
    assert (err <= scales[..., None] / 2 * (1 + EPS) + EPS).all()


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 8), pairs=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_pack_unpack_exact(rows, pairs, seed):
    codes = torch.randint(0, 16, (rows, 2 * pairs), generator=torch.Generator().manual_seed(seed)).to(torch.uint8)
    packed = pack_int4(codes)
    assert packed.shape == (rows, pairs) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), codes)
    assert torch.equal(packed[:, 0] >> 4, codes[:, 0])  # even column in the high nibble


def test_constant_groups_are_exact():
    w = torch.full((4, 64), 0.25)
    assert torch.equal(dequantize_int4(*quantize_int4(w, 32)), w)
    assert torch.allclose(dequantize_int8(*quantize_int8(w)), w)
    assert torch.equal(dequantize_int8(*quantize_int8(torch.zeros(3, 5))), torch.zeros(3, 5))


def test_int4_rejects_indivisible_in_features():
    with pytest.raises(ValueError, match="divisible"):
        quantize_int4(torch.randn(4, 48), 32)


def _linear(out_f=96, in_f=256, bias=True, dtype=torch.float32) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(in_f, out_f, bias=bias).to(dtype)


def _x(in_f=256, dtype=torch.float32):
    return torch.randn(2, 5, in_f, generator=torch.Generator().manual_seed(1)).to(dtype)


@pytest.mark.parametrize("bias", [True, False])
def test_int8_linear_reference_matches_dequantized_matmul(bias):
    lin, x = _linear(bias=bias), _x()
    layer = Int8Linear.from_linear(lin, "reference")
    w = dequantize_int8(layer.weight, layer.scales)
    torch.testing.assert_close(layer(x), nn.functional.linear(x, w, lin.bias))
    # and close to the float layer: per-element weight error <= scale/2
    bound = (x.abs() @ (layer.scales[:, None] / 2).expand(-1, 256).T).max()
    assert (layer(x) - lin(x)).abs().max() <= bound + 1e-5


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_linear_reference_close_to_float(group):
    lin, x = _linear(), _x()
    layer = Int4Linear.from_linear(lin, group, "reference")
    per_col = (layer.scales / 2).repeat_interleave(group, dim=1)  # (out, in) error bound per weight
    bound = (x.abs() @ per_col.T)
    assert ((layer(x) - lin(x)).abs() <= bound + 1e-5).all()


def _has(op: str) -> bool:
    return hasattr(torch.ops.aten, op)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.skipif(not _has("_weight_int8pack_mm"), reason="no torch int8 kernel")
def test_int8_torch_backend_equals_reference(dtype):
    lin, x = _linear(dtype=dtype), _x(dtype=dtype)
    ref = Int8Linear.from_linear(lin, "reference")(x).float()
    got = Int8Linear.from_linear(lin, "torch")(x).float()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, ref, rtol=tol, atol=tol * ref.abs().max().item())


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.skipif(not _has("_weight_int4pack_mm_for_cpu"), reason="no torch int4 CPU kernel")
def test_int4_tinygemm_cpu_equals_reference(group, dtype):
    lin, x = _linear(dtype=dtype), _x(dtype=dtype)
    ref = Int4Linear.from_linear(lin, group, "reference")(x).float()
    got = Int4Linear.from_linear(lin, group, "tinygemm")(x).float()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, ref, rtol=tol, atol=tol * ref.abs().max().item())


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="backend"):
        Int8Linear.from_linear(_linear(), "magic")
    with pytest.raises(ValueError, match="backend"):
        Int4Linear.from_linear(_linear(), 64, "magic")


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("group", [32, 64, 128])
def test_tinygemm_cuda_equals_reference(group):
    lin, x = _linear(dtype=torch.bfloat16).cuda(), _x(dtype=torch.bfloat16).cuda()
    ref = Int4Linear.from_linear(lin, group, "reference")(x).float()
    got = Int4Linear.from_linear(lin, group, "tinygemm")(x).float()
    torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())


@pytest.mark.gpu
@cuda
def test_int8_cuda_auto_backend_equals_reference():
    from quant import quantize

    model = nn.Sequential(_linear(dtype=torch.bfloat16)).cuda()
    x = _x(dtype=torch.bfloat16).cuda()
    ref = Int8Linear.from_linear(model[0], "reference")(x).float()
    got = quantize(model, bits=8, skip=())(x).float()
    torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())


@pytest.mark.gpu
@cuda
def test_graph_timing_reads_weights_from_device_memory():
    """quant.timing: copies of the layer outgrow L2, so the rate stays below any GPU's memory bandwidth."""
    from quant import timing

    lin = nn.Linear(4096, 4096, bias=False, dtype=torch.bfloat16, device="cuda")
    x = torch.randn(1, 4096, dtype=torch.bfloat16, device="cuda")
    seconds = timing.seconds(lin, x)
    assert 2 * 4096 * 4096 / seconds < 6e12, f"{2 * 4096 * 4096 / seconds / 1e9:.0f} GB/s: weights came from L2"
    assert seconds < timing.wall_seconds(lin, x)        # no launch overhead in a replayed graph
