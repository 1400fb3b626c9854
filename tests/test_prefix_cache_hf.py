"""Prefix cache with a real (tiny, random) transformers model: reuse must not change logits."""

from __future__ import annotations

import pytest
import torch
import transformers

from prefix_cache import PrefixCache
from prefix_cache.hf_cache import cache_from_kv, check_supported, kv_from_cache


@pytest.fixture(scope="module")
def model():
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    m = transformers.LlamaForCausalLM(config).float().eval()
    m.generation_config.eos_token_id = None
    m.generation_config.pad_token_id = 0
    return m


def _ids(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, (1, n), generator=torch.Generator().manual_seed(seed))   # (1, n)


@torch.no_grad()
def _cached_prefix(model, ids: torch.Tensor, cache: PrefixCache):
    """Prefill the first 40 tokens, insert them, and match ``ids``."""
    out = model(ids[:, :40], use_cache=True)
    assert cache.insert(ids[0, :40], kv_from_cache(out.past_key_values)) == 32
    return cache.match(ids[0])


@torch.no_grad()
def test_logits_after_hit_equal_full_forward(model):
    ids = _ids(45)
    cache = PrefixCache(max_bytes=1 << 24, block_size=16)
    with _cached_prefix(model, ids, cache) as hit:
        assert hit.num_tokens == 32
        kv = hit.kv()
        assert len(kv) == 2 and kv[0][0].shape == (1, 2, 32, 16)
        past = cache_from_kv(kv, model.config)
    assert past.get_seq_length() == 32
    rest = ids[:, 32:]                                                          # 13 tokens
    positions = torch.arange(32, 45).unsqueeze(0)
    got = model(rest, past_key_values=past, position_ids=positions).logits      # (1, 13, V)
    want = model(ids).logits[:, 32:]                                            # no cache at all
    assert torch.allclose(got, want, atol=1e-5)


@torch.no_grad()
def test_generate_from_cached_prefix_equals_plain(model):
    ids = _ids(45, seed=2)
    cache = PrefixCache(max_bytes=1 << 24, block_size=16)
    with _cached_prefix(model, ids, cache) as hit:
        past = cache_from_kv(hit.kv(), model.config)
    plain = model.generate(ids, max_new_tokens=12, do_sample=False)
    cached = model.generate(ids, past_key_values=past, max_new_tokens=12, do_sample=False)
    assert torch.equal(plain, cached)
    assert past.get_seq_length() == 45 + 12 - 1                                # generate continued our cache


def test_kv_from_cache_rows_and_refusals(model):
    ids = torch.cat([_ids(20, 3), _ids(20, 4)])                                  # (2, 20)
    with torch.no_grad():
        past = model(ids, use_cache=True).past_key_values
    k0, k1 = kv_from_cache(past, row=0)[0][0], kv_from_cache(past, row=1)[0][0]
    assert k0.shape == (1, 2, 20, 16) and not torch.equal(k0, k1)
    with pytest.raises(ValueError, match="row 2"):
        kv_from_cache(past, row=2)
    with pytest.raises(ValueError, match="DynamicCache"):
        kv_from_cache(((k0, k0),))
    with pytest.raises(ValueError, match="layers"):
        cache_from_kv(kv_from_cache(past)[:1], model.config)


@pytest.mark.parametrize("config, needle", [
    (transformers.MistralConfig(sliding_window=64), "sliding"),
    (transformers.Qwen2Config(use_sliding_window=True, sliding_window=64, max_window_layers=0), "sliding"),
    (transformers.Gemma2Config(), "sliding_attention"),
    (transformers.MambaConfig(), "mamba"),
    (transformers.T5Config(), "encoder-decoder"),
])
def test_check_supported_refuses_non_full_attention(config, needle):
    with pytest.raises(ValueError, match=needle) as err:
        check_supported(config)
    assert config.model_type in str(err.value) and "without a prefix cache" in str(err.value)


@pytest.mark.parametrize("config", [transformers.LlamaConfig(), transformers.MistralConfig(sliding_window=None),
                                    transformers.Qwen2Config(), transformers.GPT2Config()])
def test_check_supported_accepts_full_attention(config):
    check_supported(config)
