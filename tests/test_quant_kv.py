"""QuantizedKVCache: quantizer round trips, exact residual behaviour, crop, memory."""

from __future__ import annotations

import pytest
import torch
import transformers
from hypothesis import given, settings, strategies as st
from transformers import DynamicCache

from conftest import hf_greedy, prompts, tiny_model
from quant import QuantizedKVCache
from quant.kv import dequantize_per_channel, dequantize_per_token, quantize_per_channel, quantize_per_token


@settings(max_examples=25, deadline=None)
@given(bits=st.sampled_from([8, 4]), groups=st.integers(1, 4), group=st.sampled_from([4, 16, 64]),
       d=st.sampled_from([2, 8, 16]), seed=st.integers(0, 2**16))
def test_quantizers_round_trip_within_half_scale(bits, groups, group, d, seed):
    x = torch.randn(2, 3, groups * group, d, generator=torch.Generator().manual_seed(seed)) * 4
    qk = quantize_per_channel(x, bits, group)
    assert qk.scale.shape == (2, 3, groups, d)
    err_k = (dequantize_per_channel(qk, bits, group, x.dtype) - x).abs().reshape(2, 3, groups, group, d)
    assert (err_k <= qk.scale.unsqueeze(-2) / 2 * (1 + 1e-5) + 1e-6).all()
    qv = quantize_per_token(x, bits)
    assert qv.scale.shape == (2, 3, groups * group, 1)
    assert qv.data.shape[-1] == (d if bits == 8 else d // 2)
    err_v = (dequantize_per_token(qv, bits, x.dtype) - x).abs()
    assert (err_v <= qv.scale / 2 * (1 + 1e-5) + 1e-6).all()


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def _logits(model, ids, mask, cache):
    with torch.no_grad():
        return model(ids, attention_mask=mask, past_key_values=cache, use_cache=True).logits


@pytest.mark.parametrize("bits", [8, 4])
def test_generate_exact_when_residual_covers_everything(model, bits):
    ids, mask = prompts(2, [10, 6])
    ref = hf_greedy(model, ids, mask, 24)
    cache = QuantizedKVCache(model.config, bits=bits, residual_length=64, group_size=16)
    out = hf_greedy(model, ids, mask, 24, past_key_values=cache)
    assert torch.equal(out, ref)
    assert cache.layers[0].quantized_length == 0
    assert cache.get_seq_length() == ref.shape[1] - 1


@pytest.mark.parametrize("bits,tol", [(8, 0.02), (4, 0.15)])
def test_small_residual_logits_close(model, bits, tol):
    ids, mask = prompts(1, [40])
    ref_cache, cache = DynamicCache(config=model.config), QuantizedKVCache(model.config, bits, 8, 16)
    _logits(model, ids, mask, ref_cache), _logits(model, ids, mask, cache)
    assert cache.layers[0].quantized_length == 32  # 40 tokens: 32 quantized, 8 residual
    nxt = torch.randint(3, 96, (1, 6), generator=torch.Generator().manual_seed(5))
    mask2 = torch.ones(1, 46, dtype=torch.long)
    ref, got = _logits(model, nxt, mask2, ref_cache), _logits(model, nxt, mask2, cache)
    assert (got - ref).abs().max() / ref.abs().max() < tol
    assert cache.get_seq_length() == ref_cache.get_seq_length() == 46


def test_generate_with_small_residual_mostly_agrees(model):
    ids, mask = prompts(2, [12, 9])
    ref = hf_greedy(model, ids, mask, 30)
    out = hf_greedy(model, ids, mask, 30, past_key_values=QuantizedKVCache(model.config, 8, 4, 4))
    assert out.shape == ref.shape and (out == ref).float().mean() > 0.8


def _feed(model, tokens, cache):
    mask = torch.ones(1, cache.get_seq_length() + tokens.shape[1], dtype=torch.long)
    return _logits(model, tokens, mask, cache)


@pytest.mark.parametrize("drop", [3, 9, 20])
def test_crop_then_continue_equals_fresh_run(model, drop):
    """Drop `drop` tokens (inside the residual, across a group, deep into the quantized past)."""
    g = torch.Generator().manual_seed(3)
    seq, extra = torch.randint(3, 96, (1, 40), generator=g), torch.randint(3, 96, (1, 5), generator=g)
    kept = 40 - drop
    for residual, exact in ((64, True), (8, False)):
        cache = QuantizedKVCache(model.config, bits=8, residual_length=residual, group_size=8)
        _feed(model, seq, cache)
        before, qlen = cache.layers[0].dequantized(), cache.layers[0].quantized_length
        cache.crop(-drop)
        assert cache.get_seq_length() == kept
        if kept >= qlen:  # rolled back inside the full-precision residual: bit-exact
            torch.testing.assert_close(cache.layers[0].dequantized(), tuple(t[..., :kept, :] for t in before),
                                       rtol=0, atol=0)
        got = _feed(model, extra, cache)
        fresh = QuantizedKVCache(model.config, bits=8, residual_length=residual, group_size=8)
        _feed(model, seq[:, :kept], fresh)
        want = _feed(model, extra, fresh)
        if exact:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        else:  # which tokens are still full precision differs from a fresh run's
            assert (got - want).abs().max() / want.abs().max() < 0.02
        assert cache.get_seq_length() == fresh.get_seq_length() == kept + 5


def test_crop_inside_residual_is_exact_and_legacy_positive_form(model):
    seq = torch.randint(3, 96, (1, 30), generator=torch.Generator().manual_seed(4))
    cache = QuantizedKVCache(model.config, bits=4, residual_length=16, group_size=8)
    _logits(model, seq, torch.ones_like(seq), cache)
    layer = cache.layers[0]
    assert layer.quantized_length == 8 and layer.keys.shape[-2] == 22
    before = layer.keys.clone()
    cache.crop(25)  # legacy: keep 25
    assert cache.get_seq_length() == 25 and torch.equal(layer.keys, before[..., :17, :])
    cache.crop(0)
    assert cache.get_seq_length() == 25
    cache.crop(-25)
    assert cache.get_seq_length() == 0 and layer.qkeys is None


def test_batch_select_and_reorder(model):
    ids, mask = prompts(3, [20, 14, 17])
    cache = QuantizedKVCache(model.config, bits=8, residual_length=4, group_size=4)
    _logits(model, ids, mask, cache)
    k_all, v_all = cache.layers[1].dequantized()
    cache.batch_select_indices(torch.tensor([2, 0]))
    k, v = cache.layers[1].dequantized()
    torch.testing.assert_close(k, k_all[[2, 0]])
    cache.reorder_cache(torch.tensor([1, 0]))
    torch.testing.assert_close(cache.layers[1].dequantized()[1], v_all[[0, 2]])


def _kv_bytes_ratio(bits: int, head_dim: int) -> float:
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=2 * head_dim, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                      max_position_embeddings=4096)
    torch.manual_seed(0)
    m = transformers.AutoModelForCausalLM.from_config(config).eval().to(torch.bfloat16)
    ids = torch.randint(0, 64, (1, 2048))
    full, cache = DynamicCache(config=config), QuantizedKVCache(config, bits=bits)
    with torch.no_grad():
        m(ids, past_key_values=full, use_cache=True), m(ids, past_key_values=cache, use_cache=True)
    full_bytes = sum(t.numel() * t.element_size() for t in (full.layers[0].keys, full.layers[0].values))
    return cache.nbytes() / full_bytes


def test_nbytes_2k_tokens():
    assert 0.45 < _kv_bytes_ratio(8, 128) < 0.6   # "roughly half" of bf16/fp16
    assert _kv_bytes_ratio(4, 128) <= 0.30        # head_dim 128 (Llama-3): 0.296
    assert _kv_bytes_ratio(4, 64) <= 0.31         # head_dim 64: scale overhead makes it 0.304


def test_rejects_bad_config(model):
    with pytest.raises(ValueError, match="bits"):
        QuantizedKVCache(model.config, bits=2)
    cfg = transformers.Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    with pytest.raises(ValueError, match="full-attention"):
        QuantizedKVCache(cfg)


@pytest.mark.parametrize("keep", [0, 5, 16, 21, 37])
def test_crop_into_quantized_past_keeps_dequantized_prefix(keep):
    """State after crop == the first `keep` tokens of what the cache returned before (any cut point)."""
    config = transformers.LlamaConfig(num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                      hidden_size=16)
    cache = QuantizedKVCache(config, bits=4, residual_length=4, group_size=8)
    k, v = torch.randn(2, 2, 45, 8), torch.randn(2, 2, 45, 8)
    cache.update(k[:, :, :30], v[:, :, :30], 0)
    cache.update(k[:, :, 30:], v[:, :, 30:], 0)
    before = cache.layers[0].dequantized()
    cache.crop(keep - 45)
    after = cache.layers[0].dequantized()
    assert cache.get_seq_length() == keep
    for a, b in zip(after, before):
        torch.testing.assert_close(a, b[..., :keep, :], rtol=0, atol=0)
