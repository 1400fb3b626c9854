"""specdec.generate with a PrefixCache: identical output, and only the suffix is prefilled."""

import threading

import pytest
import torch

import specdec
from conftest import hf_greedy, prompts, tiny_model
from prefix_cache import PrefixCache



def _count_tokens(model):
    seen = []
    original = model.forward

    def forward(*args, **kwargs):
        seen.append(kwargs["input_ids"].shape[1])
        return original(*args, **kwargs)

    model.forward = forward
    return seen, lambda: setattr(model, "forward", original) or model.__dict__.pop("forward", None)


def test_second_call_prefills_only_the_suffix():
    model = tiny_model("llama")
    cache = PrefixCache(max_bytes=64 << 20, block_size=16)
    shared = prompts(1, [512], seed=4)[0]
    first = torch.cat([shared, torch.tensor([[5, 6, 7]])], dim=1)
    second = torch.cat([shared, torch.tensor([[9, 10, 11, 12]])], dim=1)
    out1 = specdec.generate(model, first, max_new_tokens=8, prefix_cache=cache)
    seen, restore = _count_tokens(model)
    out2, stats = specdec.generate(model, second, max_new_tokens=8, prefix_cache=cache, return_stats=True)
    restore()
    assert seen[0] == 516 - 512  # only the 4 new tokens ran through prefill
    assert stats.cached_prompt_tokens == [512]
    assert torch.equal(out1, hf_greedy(model, first, torch.ones_like(first), 8))
    assert torch.equal(out2, hf_greedy(model, second, torch.ones_like(second), 8))
    assert cache.stats.hits >= 1


@pytest.mark.parametrize("drafter", [{}, {"prompt_lookup_num_tokens": 4}, {"draft_model": "self:1"}])
def test_five_turn_chat_identical_with_and_without_cache(drafter):
    model = tiny_model("llama")
    cache = PrefixCache(max_bytes=64 << 20, block_size=16)
    history = prompts(1, [40], seed=9)[0]
    for turn in range(5):
        ref = hf_greedy(model, history, torch.ones_like(history), 12)
        out, stats = specdec.generate(model, history, max_new_tokens=12, prefix_cache=cache, return_stats=True,
                                      **drafter)
        assert torch.equal(out, ref), turn
        if turn:
            assert stats.cached_prompt_tokens[0] >= 16 * ((history.shape[1] - 20) // 16)
        user = torch.randint(3, 90, (1, 7), generator=torch.Generator().manual_seed(turn))
        history = torch.cat([out, user], dim=1)


def test_batch_rows_hit_different_prefixes():
    model = tiny_model("llama")
    cache = PrefixCache(max_bytes=64 << 20, block_size=8)
    ids, mask = prompts(4, [40, 25, 33, 12], seed=2)
    specdec.generate(model, ids[:2], mask[:2], max_new_tokens=6, prefix_cache=cache)
    out = specdec.generate(model, ids, mask, max_new_tokens=6, prefix_cache=cache, draft_model="self:1")
    assert torch.equal(out, hf_greedy(model, ids, mask, 6))


def test_namespaces_never_share_hits():
    model = tiny_model("llama")
    cache = PrefixCache(max_bytes=64 << 20, block_size=16)
    ids = prompts(1, [64], seed=5)[0]
    specdec.generate(model, ids, max_new_tokens=4, prefix_cache=cache, cache_namespace="alice")
    _, stats = specdec.generate(model, ids, max_new_tokens=4, prefix_cache=cache, cache_namespace="bob",
                                return_stats=True)
    assert stats.cached_prompt_tokens == [0]
    _, stats = specdec.generate(model, ids, max_new_tokens=4, prefix_cache=cache, cache_namespace="alice",
                                return_stats=True)
    assert stats.cached_prompt_tokens == [48]


def test_small_budget_churn_keeps_results_and_budget():
    model = tiny_model("llama")
    cache = PrefixCache(max_bytes=200_000, block_size=8)
    for seed in range(12):
        ids = prompts(1, [30 + seed], seed=seed % 4)[0]
        out = specdec.generate(model, ids, max_new_tokens=5, prefix_cache=cache)
        assert torch.equal(out, hf_greedy(model, ids, torch.ones_like(ids), 5))
        assert cache.nbytes <= 200_000


def test_concurrent_threads_match_sequential():
    model = tiny_model("llama")
    cache = PrefixCache(max_bytes=64 << 20, block_size=8)
    inputs = [prompts(1, [20 + i], seed=i % 3)[0] for i in range(6)]
    expected = [hf_greedy(model, x, torch.ones_like(x), 6) for x in inputs]
    results = [None] * len(inputs)

    def work(i):
        results[i] = specdec.generate(model, inputs[i], max_new_tokens=6, prefix_cache=cache)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert all(torch.equal(r, e) for r, e in zip(results, expected))


def test_sliding_window_model_is_refused():
    import transformers

    config = transformers.MistralConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, sliding_window=16)
    model = transformers.MistralForCausalLM(config).eval()
    with pytest.raises(ValueError, match="sliding"):
        specdec.generate(model, torch.ones(1, 4, dtype=torch.long), max_new_tokens=2,
                         prefix_cache=PrefixCache(max_bytes=1 << 20))
