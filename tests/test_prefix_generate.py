"""specdec.generate with a PrefixCache: identical output, and only the suffix is prefilled."""

import threading

import pytest
import torch

import specdec
from conftest import VOCAB, hf_greedy, prompts, tiny_model
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


# -- the draft model's K/V in the prefix cache ---------------------------------------------------

def _draft_module(model, draft):
    """The module a draft_model= argument runs ("self:N" is the target's cached early-exit copy)."""
    return specdec.drafters.cached_early_exit_model(model, int(draft[5:])) if isinstance(draft, str) else draft


def _shared_prompts(shared_len=512, seed=4):
    shared = prompts(1, [shared_len], seed=seed)[0]
    return torch.cat([shared, torch.tensor([[5, 6, 7]])], dim=1), torch.cat([shared, torch.tensor([[9, 10, 11, 12]])], dim=1)


@pytest.mark.parametrize("draft_kind", ["model", "self:1"])
@pytest.mark.parametrize("cache_drafts", [True, False])
def test_draft_hit_runs_only_the_suffix_through_the_draft(draft_kind, cache_drafts):
    model = tiny_model("llama")
    draft = tiny_model("llama", seed=1, layers=1) if draft_kind == "model" else draft_kind
    first, second = _shared_prompts()
    kw = dict(max_new_tokens=8, draft_model=draft, num_draft_tokens=3)
    cache = PrefixCache(max_bytes=64 << 20, block_size=16, cache_drafts=cache_drafts)
    specdec.generate(model, first, prefix_cache=cache, **kw)
    seen, restore = _count_tokens(_draft_module(model, draft))
    out, stats = specdec.generate(model, second, prefix_cache=cache, return_stats=True, **kw)
    restore()
    assert torch.equal(out, specdec.generate(model, second, **kw))     # the no-cache call
    assert torch.equal(out, hf_greedy(model, second, torch.ones_like(second), 8))
    assert stats.cached_prompt_tokens == [512]
    # the draft's catch-up forward: the 4 new prompt tokens + the pending one; all 517 when not cached
    assert seen[0] == (5 if cache_drafts else 517)


def test_draft_batch_rows_hit_different_prefix_lengths():
    model, draft = tiny_model("llama"), tiny_model("llama", seed=1, layers=1)
    cache = PrefixCache(max_bytes=64 << 20, block_size=8)
    long, short = prompts(1, [64], seed=6)[0], prompts(1, [48], seed=7)[0]
    kw = dict(max_new_tokens=8, draft_model=draft, num_draft_tokens=3)
    specdec.generate(model, torch.cat([long, torch.tensor([[3, 4, 5]])], dim=1), prefix_cache=cache, **kw)
    specdec.generate(model, torch.cat([short, torch.tensor([[8, 9]])], dim=1), prefix_cache=cache, **kw)
    ids = torch.zeros(2, 70, dtype=torch.long)
    ids[0] = torch.cat([long[0], torch.tensor([11, 12, 13, 14, 15, 16])])
    ids[1, 20:] = torch.cat([short[0], torch.tensor([17, 18])])
    mask = (torch.arange(70) >= torch.tensor([[0], [20]])).long()
    seen, restore = _count_tokens(draft)
    out, stats = specdec.generate(model, ids, mask, prefix_cache=cache, return_stats=True, **kw)
    restore()
    assert torch.equal(out, specdec.generate(model, ids, mask, **kw))
    assert torch.equal(out, hf_greedy(model, ids, mask, 8))
    assert stats.cached_prompt_tokens == [64, 44]   # start = min(0 + 64, 20 + 48): row 1 recomputes 4 slots
    assert seen[0] == 70 - 64 + 1                   # the draft starts from slot 64 too


def test_two_draft_objects_never_share_blocks():
    from specdec.drafters import ModelDrafter
    from specdec.prefill import draft_namespace

    model = tiny_model("llama")
    a, b = tiny_model("llama", seed=1, layers=1), tiny_model("llama", seed=1, layers=1)   # equal weights, shapes
    cache = PrefixCache(max_bytes=64 << 20, block_size=16)
    ids = _shared_prompts(128)[0]
    kw = dict(max_new_tokens=6, num_draft_tokens=3, prefix_cache=cache)
    specdec.generate(model, ids, draft_model=a, **kw)
    blocks_after_a = cache.stats.blocks
    seen, restore = _count_tokens(b)
    out = specdec.generate(model, ids, draft_model=b, **kw)
    restore()
    assert seen[0] == ids.shape[1] + 1                          # b found none of a's blocks
    assert cache.stats.blocks > blocks_after_a                  # and stored its own
    assert torch.equal(out, hf_greedy(model, ids, torch.ones_like(ids), 6))
    ns = lambda m, tenant=None: draft_namespace(ModelDrafter(m, VOCAB), cache, tenant)  # noqa: E731
    assert ns(a) == ns(a) != ns(b)   # equal weights and shapes, other objects
    assert ns(a, "alice") != ns(a, "bob") and ns(a, "") != ns(a, None)
    old = ns(tiny_model("llama", seed=1, layers=1))              # collected now: its id() may come back
    assert all(ns(tiny_model("llama", seed=1, layers=1)) != old for _ in range(3))


def test_draft_blocks_are_per_tenant():
    model, draft = tiny_model("llama"), tiny_model("llama", seed=1, layers=1)
    cache = PrefixCache(max_bytes=64 << 20, block_size=16)
    ids = _shared_prompts(96)[0]
    kw = dict(max_new_tokens=4, draft_model=draft, num_draft_tokens=3, prefix_cache=cache)
    specdec.generate(model, ids, cache_namespace="alice", **kw)
    seen, restore = _count_tokens(draft)
    firsts = []
    for tenant in ("bob", "alice"):
        seen.clear()
        specdec.generate(model, ids, cache_namespace=tenant, **kw)
        firsts.append(seen[0])
    restore()
    assert firsts == [ids.shape[1] + 1, ids.shape[1] + 1 - 96]     # bob misses, alice hits 96 tokens


def _blocks_after_two_calls(model, **kw) -> int:
    cache = PrefixCache(max_bytes=64 << 20, block_size=4)
    first, second = _shared_prompts(40, seed=11)
    for ids in (first, second):
        out = specdec.generate(model, ids, max_new_tokens=8, prefix_cache=cache, **kw)
        assert torch.equal(out, hf_greedy(model, ids, torch.ones_like(ids), 8)), kw
    return cache.stats.blocks


@pytest.mark.parametrize("kw", [dict(compile=True, draft_model="self:1", num_draft_tokens=3),
                                dict(prompt_lookup_num_tokens=3), "feature"])
def test_static_feature_and_lookup_drafters_keep_prefilling(kw):
    model = tiny_model("llama", layers=4) if kw == "feature" else tiny_model("llama")
    if kw == "feature":
        from specdec.feature_draft import FeatureDraft, FeatureDraftConfig

        torch.manual_seed(0)
        kw = dict(draft_model=FeatureDraft(FeatureDraftConfig.from_target(model), model), num_draft_tokens=3)
    target_only = _blocks_after_two_calls(model, compile=kw.get("compile", False))
    assert _blocks_after_two_calls(model, **kw) == target_only       # no draft blocks stored


def test_cache_drafts_must_be_a_bool():
    with pytest.raises(TypeError, match="cache_drafts must be True or False"):
        PrefixCache(max_bytes=1 << 20, cache_drafts="no")


def test_compile_hit_loads_every_layer_with_one_copy():
    """compile=True: the static cache's layers are views of one tensor, and a hit's K/V (stored by one
    insert) reaches it with one copy for all layers; the output equals HF's."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from specdec import prefill, static

    class Copies(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Copies.count += func.overloadpacket.__name__ in ("copy_", "index_copy_", "_foreach_copy_", "cat")
            return func(*args, **(kwargs or {}))

    model = tiny_model("llama")
    cache = PrefixCache(max_bytes=64 << 20, block_size=16)
    shared = prompts(1, [96], seed=6)[0]
    first, second = (torch.cat([shared, torch.tensor([[5 + i, 6, 7]])], dim=1) for i in range(2))
    specdec.generate(model, first, max_new_tokens=4, prefix_cache=cache, compile=True)
    original = prefill.load_hit

    def counted(cache, kv, config):
        with Copies():
            cache = original(cache, kv, config)
        runner = cache.runner
        assert isinstance(runner._kv, torch.Tensor)
        assert all(layer.keys.data_ptr() == runner._kv[2 * i].data_ptr()
                   for i, layer in enumerate(runner._hf_cache.layers))
        return cache

    prefill.load_hit = counted
    try:
        out, stats = specdec.generate(model, second, max_new_tokens=8, prefix_cache=cache, compile=True,
                                      return_stats=True)
    finally:
        prefill.load_hit = original
    assert stats.cached_prompt_tokens == [96] and Copies.count == 1
    assert torch.equal(out, hf_greedy(model, second, torch.ones_like(second), 8))
    assert static.runners_of(model)["static_runners"] >= 1
