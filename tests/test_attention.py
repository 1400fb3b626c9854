"""The fast path's packed grouped-query attention and attention windows."""

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import specdec
from conftest import prompts, tiny_model
from specdec import attention, static


class _Module(torch.nn.Module):
    def __init__(self, groups: int):
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = True
        self.training = False


@pytest.mark.parametrize("n", [1, 5])
@pytest.mark.parametrize("heads,kv_heads", [(8, 2), (6, 3), (4, 4)])
def test_packed_gqa_equals_hf_sdpa(n, heads, kv_heads):
    g = torch.Generator().manual_seed(n + heads)
    B, L, D = 2, 23, 16
    q = torch.randn(B, heads, n, D, generator=g)
    k, v = torch.randn(B, kv_heads, L, D, generator=g), torch.randn(B, kv_heads, L, D, generator=g)
    mask = torch.rand(B, 1, n, L, generator=g) > 0.3
    mask[..., 0] = True                                   # every query sees at least one key
    module = _Module(heads // kv_heads)
    want, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=D ** -0.5)
    got, _ = attention.packed_gqa_sdpa(module, q, k, v, mask, scaling=D ** -0.5)
    assert got.shape == (B, n, heads, D)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_attention_implementation_is_restored_even_on_error():
    model = tiny_model("llama")
    before = model.config._attn_implementation
    with pytest.raises(RuntimeError):
        with attention.attention_implementation(model, attention.PACKED_GQA):
            assert model.config._attn_implementation == attention.PACKED_GQA
            raise RuntimeError("boom")
    assert model.config._attn_implementation == before


def test_static_path_uses_packed_gqa_and_small_windows(monkeypatch):
    model = tiny_model("llama")                           # 4 query heads over 2 K/V heads
    seen = []
    real = attention.packed_gqa_sdpa

    def spy(module, query, key, *a, **kw):
        seen.append(key.shape[2])
        return real(module, query, key, *a, **kw)

    monkeypatch.setattr(attention, "packed_gqa_sdpa", spy)
    ids, mask = prompts(1, [9], seed=2)
    slow = specdec.generate(model, ids, mask, max_new_tokens=8)
    fast = specdec.generate(model, ids, mask, max_new_tokens=8, compile=True)
    assert torch.equal(fast, slow)
    assert seen and set(seen) == {256}                     # a 256-slot window, not the whole cache


def test_attention_windows():
    assert static._attend_bucket(1, 2048) == 256 and static._attend_bucket(257, 2048) == 512
    assert static._attend_bucket(3000, 4096) == 4096 and static._attend_bucket(100, 128) == 128
    assert static._attend_buckets(2048) == [256, 512, 1024, 2048]
    assert static._attend_buckets(12288) == [256, 512, 1024, 2048, 4096, 8192, 12288]
