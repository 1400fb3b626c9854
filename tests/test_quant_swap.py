"""quantize(): swapping a tiny Llama's linears, backend choice, errors."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

from conftest import prompts, tiny_model
from quant import Int4Linear, Int8Linear, quantize


@pytest.fixture(scope="module")
def base():
    return tiny_model("llama")


def _logits(model, ids, mask):
    with torch.no_grad():
        return model(ids, attention_mask=mask).logits


@pytest.mark.parametrize("bits,group,tol", [(8, 64, 0.03), (4, 32, 0.25), (4, 64, 0.3)])
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_logits_close_to_fp32(base, bits, group, tol, backend):
    ids, mask = prompts(2, [12, 8])
    ref = _logits(base, ids, mask)
    q = quantize(copy.deepcopy(base), bits=bits, group_size=group, backend=backend)
    got = _logits(q, ids, mask)
    rel = (got - ref).abs().max() / ref.abs().max()
    assert rel < tol, f"relative logit error {rel:.3f}"
    kind = Int8Linear if bits == 8 else Int4Linear
    assert isinstance(q.model.layers[0].mlp.down_proj, kind)
    assert type(q.lm_head) is nn.Linear  # skipped by default


def test_auto_equals_reference_on_cpu(base):
    ids, mask = prompts(1, [10])
    for bits in (8, 4):
        auto = _logits(quantize(copy.deepcopy(base), bits=bits), ids, mask)
        ref = _logits(quantize(copy.deepcopy(base), bits=bits, backend="reference"), ids, mask)
        torch.testing.assert_close(auto, ref, rtol=1e-4, atol=1e-4)


def test_auto_logs_choice_and_falls_back(base, caplog, monkeypatch):
    with caplog.at_level(logging.INFO, logger="quant.swap"):
        quantize(copy.deepcopy(base), bits=8)
    assert "uses backend" in caplog.text

    import quant.int8

    def broken(*a, **k):
        raise RuntimeError("no kernel here")

    monkeypatch.setattr(quant.int8, "_torch_int8_mm", broken)
    q = quantize(copy.deepcopy(base), bits=8)
    assert {m.backend for m in q.modules() if isinstance(m, Int8Linear)} == {"reference"}


def test_skip_patterns(base):
    q = quantize(copy.deepcopy(base), bits=8, skip=("lm_head", "*.mlp.*"))
    assert type(q.model.layers[0].mlp.up_proj) is nn.Linear
    assert isinstance(q.model.layers[0].self_attn.q_proj, Int8Linear)
    q = quantize(copy.deepcopy(base), bits=8, skip=())
    assert isinstance(q.lm_head, Int8Linear)


def test_quantize_twice_is_harmless(base):
    q = quantize(quantize(copy.deepcopy(base), bits=8), bits=8)
    assert isinstance(q.model.layers[1].self_attn.o_proj, Int8Linear)


def test_gpt2_conv1d_is_quantized():
    model = tiny_model("gpt2")
    ids, mask = prompts(1, [9])
    ref = _logits(model, ids, mask)
    q = quantize(copy.deepcopy(model), bits=8)
    assert isinstance(q.transformer.h[0].attn.c_attn, Int8Linear)
    assert (_logits(q, ids, mask) - ref).abs().max() / ref.abs().max() < 0.03


def test_clear_errors(base):
    with pytest.raises(ValueError, match="bits must be 8 or 4"):
        quantize(copy.deepcopy(base), bits=3)
    with pytest.raises(ValueError, match="group_size must be one of"):
        quantize(copy.deepcopy(base), bits=4, group_size=48)
    with pytest.raises(ValueError, match="backend"):
        quantize(copy.deepcopy(base), bits=8, backend="tinygemm")
    odd = nn.Sequential(nn.Linear(96, 8), nn.Linear(8, 4))
    with pytest.raises(ValueError, match=r"layer '0'.*in_features=96.*group_size=64.*\[32\]"):
        quantize(odd, bits=4, group_size=64)
    assert type(odd[0]) is nn.Linear  # nothing replaced before the error


def test_unsupported_layers_named():
    class MyLinear(nn.Linear):
        pass

    with pytest.raises(ValueError, match="'0' is a MyLinear"):
        quantize(nn.Sequential(MyLinear(64, 64)), bits=8)
    with pytest.raises(ValueError, match="no nn.Linear.*Conv2d"):
        quantize(nn.Sequential(nn.Conv2d(3, 3, 1)), bits=8)


def test_bnb_missing_says_how_to_install(base):
    try:
        import bitsandbytes  # noqa: F401
        pytest.skip("bitsandbytes installed")
    except ImportError:
        pass
    with pytest.raises(ImportError, match=r"pip install \.\[bnb\]"):
        quantize(copy.deepcopy(base), bits=8, backend="bnb")


def test_memory_shrinks(base):
    def weight_bytes(m):
        return sum(b.numel() * b.element_size() for n, b in m.model.layers.named_buffers()) + \
            sum(p.numel() * p.element_size() for p in m.model.layers.parameters() if p.dim() == 2)

    full = weight_bytes(base)
    assert weight_bytes(quantize(copy.deepcopy(base), bits=8, backend="reference")) < 0.3 * full
    assert weight_bytes(quantize(copy.deepcopy(base), bits=4, backend="reference")) < 0.2 * full


def test_auto_prefers_reference_when_kernel_is_slower(base, monkeypatch):
    import quant.swap

    monkeypatch.setattr(quant.swap, "_seconds", lambda layer, x: 1.0 if layer.backend != "reference" else 0.1)
    q = quantize(copy.deepcopy(base), bits=4)
    assert {m.backend for m in q.modules() if isinstance(m, Int4Linear)} == {"reference"}


def _fake_triton(monkeypatch, result):
    """backend "triton" built without triton, its product replaced by ``result(x2d, q, scales, bias)``."""
    import quant.swap
    import quant.triton_backend

    monkeypatch.setattr(quant.triton_backend, "require", lambda: None)
    monkeypatch.setattr(quant.triton_backend, "int8_mm", result)
    monkeypatch.setattr(quant.swap, "_candidates", lambda bits, device: ("torch", "triton"))
    fast = {"torch": 0.5, "triton": 0.2, "reference": 1.0}
    monkeypatch.setattr(quant.swap, "_seconds", lambda layer, x: fast[layer.backend])


def _int8_backends(model):
    return {m.backend for m in model.modules() if isinstance(m, Int8Linear)}


def test_auto_picks_the_fastest_backend_that_agrees(base, monkeypatch):
    def exact(x2d, q, scales, bias):
        y = nn.functional.linear(x2d, q.to(x2d.dtype)) * scales
        return y if bias is None else y + bias

    _fake_triton(monkeypatch, exact)
    assert _int8_backends(quantize(copy.deepcopy(base), bits=8)) == {"triton"}
    _fake_triton(monkeypatch, lambda x2d, q, scales, bias: torch.zeros(x2d.shape[0], q.shape[0]))
    assert _int8_backends(quantize(copy.deepcopy(base), bits=8)) == {"torch"}   # triton disagrees


def test_triton_backend_without_triton_says_how_to_install(base, monkeypatch):
    import quant.triton_backend

    monkeypatch.setattr(quant.triton_backend, "available", lambda: False)
    with pytest.raises(ImportError, match="pip install triton"):
        quantize(copy.deepcopy(base), bits=4, backend="triton")


def test_wall_timing_on_cpu():
    from quant import timing

    assert 0 < timing.seconds(nn.Linear(64, 64), torch.randn(1, 64)) < 1
