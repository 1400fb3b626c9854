"""The Triton weight-only kernels (quant/triton_kernels.py) against dequantize + F.linear.

Without CUDA they run in Triton's interpreter on CPU tensors (TRITON_INTERPRET=1, set here before the
kernels are first defined; the interpreter of triton 3.9 works with numpy 2.4, that of 3.6 does not).
Without triton (CI) the whole module is skipped. The ``gpu`` tests check 8B-shaped layers, CUDA
graph capture and backend="auto" on a GPU.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from conftest import prompts, tiny_model  # noqa: E402
from quant import (Int4Linear, Int8Linear, dequantize_int4, dequantize_int8, quantize,  # noqa: E402
                   quantize_int4, quantize_int8)
from quant import triton_ops  # noqa: E402
from quant.triton_ops import KernelConfig  # noqa: E402

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _w(n: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * (0.5 + torch.rand(n, 1, generator=g))


def _x(m: int, k: int, dtype, seed: int = 1) -> torch.Tensor:
    return torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)


def _close(got: torch.Tensor, want: torch.Tensor, dtype) -> None:
    tol = 1e-5 if dtype == torch.float32 else 1e-2   # bf16: the output's own rounding
    err = (got.float() - want.float()).abs().max().item()
    assert err <= tol * want.abs().max().item(), f"max error {err:.3g} vs max |y| {want.abs().max().item():.3g}"


def _int8(n, k, dtype, bias):
    q, s = quantize_int8(_w(n, k).to(dtype))
    b = torch.randn(n).to(dtype) if bias else None
    want = lambda x: F.linear(x.float(), dequantize_int8(q, s).to(DEVICE), None if b is None else b.float().to(DEVICE))
    return (q.to(DEVICE), s.to(DEVICE), None if b is None else b.to(DEVICE)), want


def _int4(n, k, group, dtype, bias):
    packed, s, z = quantize_int4(_w(n, k).to(dtype), group)
    b = torch.randn(n).to(dtype) if bias else None
    w = dequantize_int4(packed, s, z, dtype).float().to(DEVICE)   # the weight as the reference layer sees it
    want = lambda x: F.linear(x.float(), w, None if b is None else b.float().to(DEVICE))
    return (packed.to(DEVICE), s.to(DEVICE), z.to(DEVICE)), (None if b is None else b.to(DEVICE)), want


# N not a multiple of the row tile, K not of the step: every mask is exercised
SHAPES = [(48, 256), (40, 96)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 3, 17])
@pytest.mark.parametrize("n,k", SHAPES)
def test_int8_kernels_match_dequantized_matmul(dtype, m, n, k):
    (q, s, b), want = _int8(n, k, dtype, bias=m != 3)
    x = _x(m, k, dtype)
    _close(triton_ops.int8_linear(x, q, s, b), want(x), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 5])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_kernels_match_dequantized_matmul(dtype, m, group):
    n, k = 40, 384                                   # 3 groups of 128: a loop step past the last group
    (packed, s, z), b, want = _int4(n, k, group, dtype, bias=m == 1)
    x = _x(m, k, dtype)
    _close(triton_ops.int4_linear(x, packed, s, z, group, b), want(x), dtype)


@pytest.mark.parametrize("config", [KernelConfig(1, 16, 64), KernelConfig(16, 16, 32), KernelConfig(32, 32, 128)])
def test_both_kernels_take_any_row_count(config):
    """The GEMV kernel on several rows (one program row each) and the GEMM kernel on one row."""
    (q, s, _), want8 = _int8(48, 256, torch.float32, bias=False)
    (packed, sc, z), _, want4 = _int4(48, 256, 32, torch.float32, bias=False)
    for m in (1, 4):
        x = _x(m, 256, torch.float32)
        _close(triton_ops.int8_linear(x, q, s, None, config), want8(x), torch.float32)
        _close(triton_ops.int4_linear(x, packed, sc, z, 32, None, config), want4(x), torch.float32)


def test_custom_ops_pass_opcheck():
    """Schema, fake (meta) implementation and dispatch of the ops torch.compile sees."""
    (q, s, b), _ = _int8(32, 64, torch.float32, bias=True)
    (packed, sc, z), _, _ = _int4(32, 64, 32, torch.float32, bias=False)
    x = _x(2, 64, torch.float32)
    torch.library.opcheck(triton_ops.int8_mm, (x, q, s, b))
    torch.library.opcheck(triton_ops.int4_mm, (x, packed, sc, z, 32, None))


@pytest.mark.parametrize("bits", [8, 4])
def test_layers_equal_reference_layers(bits):
    lin = nn.Linear(128, 48).to(DEVICE)
    build = (lambda b: Int8Linear.from_linear(lin, b)) if bits == 8 else (lambda b: Int4Linear.from_linear(lin, 32, b))
    fast, ref = build("triton"), build("reference")
    for rows in (1, 7, triton_ops.MAX_ROWS + 1):      # the last: a prefill, which takes torch's matmul
        x = torch.randn(1, rows, 128, device=DEVICE)
        with torch.no_grad():
            _close(fast(x), ref(x), torch.float32)


def test_cpu_input_without_interpreter_is_refused(monkeypatch):
    layer = Int8Linear.from_linear(nn.Linear(64, 16), "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        layer(torch.randn(2, 64))


@pytest.mark.parametrize("bits,group", [(8, 64), (4, 32)])
def test_quantize_with_triton_backend_matches_reference(bits, group):
    base = tiny_model("llama").to(DEVICE)
    ids, mask = prompts(2, [9, 6])
    ids, mask = ids.to(DEVICE), mask.to(DEVICE)
    with torch.no_grad():
        want = quantize(copy.deepcopy(base), bits=bits, group_size=group, backend="reference")(ids, attention_mask=mask).logits
        model = quantize(copy.deepcopy(base), bits=bits, group_size=group, backend="triton")
        got = model(ids, attention_mask=mask).logits
    assert {m.backend for m in model.modules() if isinstance(m, (Int8Linear, Int4Linear))} == {"triton"}
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


# -- GPU ----------------------------------------------------------------------------------------

EIGHT_B = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]   # joined qkv, o, joined gate/up, down


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("n,k", EIGHT_B)
def test_gpu_8b_shapes_agree_with_reference(n, k):
    lin = nn.Linear(k, n, bias=False, dtype=torch.bfloat16, device="cuda")
    layers = {(bits, b): (Int8Linear.from_linear(lin, b) if bits == 8 else Int4Linear.from_linear(lin, 64, b))
              for bits in (8, 4) for b in ("triton", "reference")}
    for m in (1, 2, 4, 13, 16, 17, 64):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            for bits in (8, 4):
                _close(layers[bits, "triton"](x), layers[bits, "reference"](x), torch.bfloat16)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("bits", [8, 4])
def test_gpu_runs_inside_a_cuda_graph(bits):
    lin = nn.Linear(4096, 4096, dtype=torch.bfloat16, device="cuda")
    layer = Int8Linear.from_linear(lin, "triton") if bits == 8 else Int4Linear.from_linear(lin, 64, "triton")
    for m in (1, 5):
        x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            layer(x)                                  # compiles the kernel before the capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                y = layer(x)
            x.copy_(torch.randn_like(x))
            graph.replay()
            torch.testing.assert_close(y, layer(x), rtol=0, atol=0)


@pytest.mark.gpu
@cuda
def test_gpu_auto_picks_triton_for_int8_on_8b_shapes():
    model = nn.Sequential(*(nn.Linear(k, n, bias=False) for n, k in EIGHT_B[1:3])).to("cuda", torch.bfloat16)
    quantize(model, bits=8, skip=())
    assert [m.backend for m in model] == ["triton", "triton"]


@pytest.mark.gpu
@cuda
def test_gpu_torch_compile_keeps_the_kernels_opaque():
    lin = nn.Linear(4096, 1024, dtype=torch.bfloat16, device="cuda")
    layer = Int4Linear.from_linear(lin, 64, "triton")
    x = torch.randn(3, 4096, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(layer, fullgraph=True)(x), layer(x), rtol=0, atol=0)


@pytest.mark.parametrize("bits", [8, 4])
def test_joined_triton_projections_match_unjoined(bits):
    from specdec.fused_linear import fused_projections, join_projections

    model = quantize(tiny_model("llama").to(DEVICE), bits=bits, group_size=32, backend="triton")
    ids = prompts(1, [7])[0].to(DEVICE)
    with torch.no_grad():
        want = model(ids).logits
        groups = join_projections(model)
        with fused_projections(groups):
            got = model(ids).logits
    assert len(groups) == 2 * model.config.num_hidden_layers and groups[0].joined.backend == "triton"
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [8, 4])
def test_torch_compile_sees_one_opaque_op(bits):
    """Dynamo traces the layer's forward in one graph, the product staying one custom op call."""
    lin = nn.Linear(64, 32, device=DEVICE)
    layer = Int8Linear.from_linear(lin, "triton") if bits == 8 else Int4Linear.from_linear(lin, 32, "triton")
    x = torch.randn(3, 64, device=DEVICE)
    with torch.no_grad():
        got = torch.compile(layer, backend="aot_eager", fullgraph=True)(x)
        torch.testing.assert_close(got, layer(x), rtol=0, atol=0)
