"""A prefix cache shared by several models: every model reads only its own K/V.

Also: prompts whose mask has holes inside, and a prefix cache together with ``kv_quant``.
"""

import gc

import pytest
import torch

import specdec
from conftest import default_model_available, hf_greedy, prompts, run_in_threads, tiny_model
from integrations import patch, unpatch
from prefix_cache import PrefixCache
from prefix_cache.identity import model_identity


def _shared(prefix: int = 64, seed: int = 3):
    """Two prompts that share ``prefix`` tokens and differ after them."""
    base = prompts(1, [prefix], seed=seed)[0]
    return [torch.cat([base, torch.tensor([[5 + i, 6, 7 + i]])], dim=1) for i in range(2)]


def _ref(model, ids, n=6, mask=None):
    return hf_greedy(model, ids, torch.ones_like(ids) if mask is None else mask, n)


def _gen(model, ids, cache, n=6, **kw):
    return specdec.generate(model, ids, max_new_tokens=n, prefix_cache=cache, return_stats=True, **kw)


def test_two_models_of_one_shape_never_read_each_others_blocks():
    a, b = tiny_model("llama", seed=0), tiny_model("llama", seed=7)
    cache = PrefixCache(max_bytes=64 << 20, block_size=16)
    first, second = _shared()
    for model, ids in ((a, first), (b, first), (a, second), (b, second)):
        out, stats = _gen(model, ids, cache)
        assert torch.equal(out, _ref(model, ids))
        assert stats.cached_prompt_tokens == ([0] if ids is first else [64])   # own blocks only


def test_two_models_in_threads_match_their_own_output():
    models = [tiny_model("llama", seed=0), tiny_model("llama", seed=7)]
    cache = PrefixCache(max_bytes=64 << 20, block_size=8)
    inputs = _shared(48) * 2
    expected = {(m, i): _ref(models[m], inputs[i]) for m in range(2) for i in range(len(inputs))}

    def work(t: int) -> None:
        for i in range(len(inputs)):
            m = (t + i) % 2
            out = specdec.generate(models[m], inputs[i], max_new_tokens=6, prefix_cache=cache)
            assert torch.equal(out, expected[(m, i)]), (t, i, m)

    run_in_threads(work, 4, timeout=300)


def test_two_patched_models_share_a_cache():
    a, b = tiny_model("llama", seed=0), tiny_model("llama", seed=7)
    first, second = _shared()
    expected = {(id(m), i): _ref(m, x) for m in (a, b) for i, x in enumerate((first, second))}
    cache = PrefixCache(max_bytes=64 << 20, block_size=16)
    patch(a, prefix_cache=cache)
    patch(b, prefix_cache=cache)
    try:
        for i, ids in enumerate((first, second, first, second)):
            for m in (a, b):
                out = m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
                assert torch.equal(out, expected[(id(m), i % 2)])
        assert cache.stats.hits >= 4
    finally:
        unpatch(a)
        unpatch(b)


def test_quantized_model_misses_its_old_blocks():
    from quant import quantize

    model = tiny_model("llama")
    cache = PrefixCache(max_bytes=64 << 20, block_size=16)
    first, second = _shared()
    _gen(model, first, cache)
    quantize(model, bits=8)
    out, stats = _gen(model, second, cache)
    assert stats.cached_prompt_tokens == [0]
    assert torch.equal(out, _ref(model, second))
    _, stats = _gen(model, first, cache)                # the quantized model's own blocks hit
    assert stats.cached_prompt_tokens == [64]


def test_model_cast_after_caching_misses_and_runs():
    model = tiny_model("llama")
    cache = PrefixCache(max_bytes=64 << 20, block_size=16)
    first, second = _shared()
    _gen(model, first, cache)
    model.to(torch.bfloat16)
    out, stats = _gen(model, second, cache)             # no "query, key, and value ... same dtype"
    assert stats.cached_prompt_tokens == [0]
    assert torch.equal(out, _ref(model, second))


def test_weights_loaded_in_place_change_the_identity():
    model, other = tiny_model("llama", seed=0), tiny_model("llama", seed=7)
    cache = PrefixCache(max_bytes=64 << 20, block_size=16)
    first, second = _shared()
    _gen(model, first, cache)
    model.load_state_dict(other.state_dict())           # same tensors, overwritten in place
    out, stats = _gen(model, second, cache)
    assert stats.cached_prompt_tokens == [0]
    assert torch.equal(out, _ref(other, second))


def test_a_new_object_never_gets_a_collected_objects_identity():
    seen = set()
    for _ in range(5):
        seen.add(model_identity(tiny_model("llama", layers=1)))
        gc.collect()                                    # the id() of the next model may be the same
    assert len(seen) == 5


def test_model_key_lets_a_cache_outlive_the_model_object():
    first, second = _shared()
    cache = PrefixCache(max_bytes=64 << 20, block_size=16)
    old = tiny_model("llama")
    cache.set_model_key(old, "tiny-llama@seed0")
    _gen(old, first, cache)
    new = tiny_model("llama")                           # the same weights, another object
    _, stats = _gen(new, second, cache)
    assert stats.cached_prompt_tokens == [0]            # no key: its own identity
    cache.set_model_key(new, "tiny-llama@seed0")
    out, stats = _gen(new, second, cache)
    assert stats.cached_prompt_tokens == [64]
    assert torch.equal(out, _ref(new, second))
    new.to(torch.bfloat16)                              # the key holds dtypes and shapes: a cast misses
    _, stats = _gen(new, second, cache)
    assert stats.cached_prompt_tokens == [0]
    with pytest.raises(TypeError, match="model_key must be a str"):
        cache.set_model_key(new, 3)


def test_a_model_used_with_a_cache_is_freed_with_its_last_reference():
    """What the identity and the static runner keep per model (its module list) does not keep it alive."""
    import weakref

    model, cache = tiny_model("llama", layers=1), PrefixCache(max_bytes=1 << 20)
    ids = prompts(1, [32], seed=1)[0]
    for compile in (False, True):
        specdec.generate(model, ids, max_new_tokens=2, prefix_cache=cache, compile=compile)
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None


def test_min_hit_tokens_skips_short_hits():
    model = tiny_model("llama")
    first, second = _shared(64)
    cache = PrefixCache(max_bytes=64 << 20, block_size=16, min_hit_tokens=80)
    _gen(model, first, cache)
    out, stats = _gen(model, second, cache)
    assert stats.cached_prompt_tokens == [0] and torch.equal(out, _ref(model, second))
    assert cache.stats.hits == 0
    cache.min_hit_tokens = 64
    _, stats = _gen(model, second, cache)
    assert stats.cached_prompt_tokens == [64]
    assert PrefixCache(1 << 20).hit_threshold(model) == 0                       # a CPU model uses every hit
    with pytest.raises(TypeError, match="min_hit_tokens must be an int"):
        PrefixCache(1 << 20, min_hit_tokens=1.5)


# ---- masks with holes inside -------------------------------------------------------------------

def _holed(ids: torch.Tensor, mask: torch.Tensor, row: int, slots: list[int]):
    mask = mask.clone()
    mask[row, slots] = 0
    return ids, mask


@pytest.mark.parametrize("compile", [False, True])
def test_interior_mask_holes_give_hf_tokens(compile):
    model = tiny_model("llama")
    cache = PrefixCache(max_bytes=64 << 20, block_size=8)
    ids, mask = prompts(3, [40, 30, 40], seed=6)
    ids[2, :32] = ids[0, :32]                                   # row 2 shares row 0's first 32 tokens
    cases = [_holed(ids, mask, 0, [3, 17]),                     # a hole in a full row
             _holed(ids, mask, 1, [12, 13]),                    # holes in a left-padded row
             (ids, mask), _holed(ids, mask, 2, [35])]
    for step, (x, m) in enumerate(cases * 2):                   # the second round finds blocks of the first
        out = specdec.generate(model, x, m, max_new_tokens=6, prefix_cache=cache, compile=compile)
        assert torch.equal(out, hf_greedy(model, x, m, 6)), step
    assert cache.stats.hits > 0


def test_interior_hole_with_an_empty_cache_does_not_crash():
    model = tiny_model("llama")
    ids, mask = prompts(2, [40, 36], seed=8)
    x, m = _holed(ids, mask, 0, [0, 1, 5])                      # leading zeros, then a hole
    for cache in (PrefixCache(max_bytes=64 << 20, block_size=4), PrefixCache(max_bytes=64 << 20, block_size=64)):
        out = specdec.generate(model, x, m, max_new_tokens=5, prefix_cache=cache)
        assert torch.equal(out, hf_greedy(model, x, m, 5))


# ---- prefix cache + kv_quant --------------------------------------------------------------------

@pytest.mark.parametrize("kv_quant,compile", [("int8", False), ("int4", False), ("int8", True)])
def test_kv_quant_hit_gives_the_tokens_of_kv_quant_alone(kv_quant, compile):
    model = tiny_model("llama")
    first, second = _shared(96)
    cache = PrefixCache(max_bytes=64 << 20, block_size=16)
    kw = dict(max_new_tokens=20, kv_quant=kv_quant, compile=compile)
    for ids in (first, second, first):
        alone = specdec.generate(model, ids, **kw)
        out, stats = specdec.generate(model, ids, prefix_cache=cache, return_stats=True, **kw)
        assert torch.equal(out, alone)
    assert stats.cached_prompt_tokens == [96]


def test_kv_quant_hit_in_a_padded_batch_with_a_draft():
    model = tiny_model("llama")
    ids, mask = prompts(2, [70, 50], seed=12)
    ids[1, 20:52] = ids[0, :32]
    cache = PrefixCache(max_bytes=64 << 20, block_size=8)
    kw = dict(max_new_tokens=8, kv_quant="int8", draft_model="self:1", num_draft_tokens=3)
    specdec.generate(model, ids[:1], mask[:1], prefix_cache=cache, **kw)
    out, stats = specdec.generate(model, ids, mask, prefix_cache=cache, return_stats=True, **kw)
    assert torch.equal(out, specdec.generate(model, ids, mask, **kw))
    assert stats.cached_prompt_tokens[0] > 0


@pytest.mark.skipif(not default_model_available(), reason="default model not installed")
def test_kv_quant_hit_on_the_default_model():
    from integrations import load_default

    model, tok = load_default()
    text = "def fibonacci(n):\n    " * 12
    base = tok(text, return_tensors="pt").input_ids
    cache = PrefixCache(max_bytes=256 << 20, block_size=16)
    for suffix in (" # first", " # second"):
        ids = torch.cat([base, tok(suffix, return_tensors="pt").input_ids], dim=1)
        alone = specdec.generate(model, ids, max_new_tokens=12, kv_quant="int8")
        out, stats = specdec.generate(model, ids, max_new_tokens=12, kv_quant="int8", prefix_cache=cache,
                                      return_stats=True)
        assert torch.equal(out, alone)
    assert stats.cached_prompt_tokens[0] >= 16


def test_kv_quant_static_short_prompt_runs_as_uncached():
    model = tiny_model("llama")
    cache = PrefixCache(max_bytes=64 << 20, block_size=4)
    ids = prompts(1, [8], seed=13)[0]            # <= the static runner's graph_max_tokens (k_max + 1 = 9)
    kw = dict(max_new_tokens=6, kv_quant="int8", compile=True, prompt_lookup_num_tokens=8)
    for _ in range(2):
        out, stats = specdec.generate(model, ids, prefix_cache=cache, return_stats=True, **kw)
        assert torch.equal(out, specdec.generate(model, ids, **kw))
        assert stats.cached_prompt_tokens == [0]


# ---- the cost of a hit --------------------------------------------------------------------------

def test_a_hit_reads_every_layer_and_block_with_one_copy():
    """A hit's K/V for all layers is per-layer views of the blocks' storage where one insert stored
    them, else one ``torch.cat`` over the runs of blocks stored together (one run per insert): no
    kernel per layer or per block."""
    import collections

    import transformers
    from torch.utils._python_dispatch import TorchDispatchMode

    from prefix_cache.hf_cache import cache_with_kv
    from specdec.prefill import gather_rows

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen[func.overloadpacket.__name__] += 1
            return func(*args, **(kwargs or {}))

    layers, heads, dim, n = 12, 2, 8, 256
    config = transformers.LlamaConfig(num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=heads,
                                      hidden_size=32, head_dim=dim)
    for inserts in (1, 4):
        cache, ids = PrefixCache(max_bytes=1 << 30, block_size=16), list(range(n))
        for i in range(1, inserts + 1):
            m = n * i // inserts
            cache.insert(ids[:m], [(torch.randn(1, heads, m, dim), torch.randn(1, heads, m, dim))
                                   for _ in range(layers)])
        ops = Ops()
        with ops:
            with cache.match(ids + [1]) as hit:
                kv = gather_rows([hit], [0], hit.num_tokens, "cpu").layers()
            cache_with_kv(kv, config)
        copies = {k: v for k, v in ops.seen.items() if k not in ("unbind", "unsqueeze", "view", "slice", "select",
                                                                   "detach", "alias", "squeeze")}
        assert copies == ({} if inserts == 1 else {"cat": 1}), (inserts, dict(ops.seen))
        assert len(kv) == layers and kv[0][0].shape == (1, heads, n, dim)


# ---- on a GPU ------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_identity_spill_threshold_and_kv_quant():
    a, b = tiny_model("llama", seed=0).cuda(), tiny_model("llama", seed=7).cuda()
    first, second = (x.cuda() for x in _shared(96))
    cache = PrefixCache(max_bytes=64 << 20, block_size=16)
    _gen(a, first, cache)
    _, stats = _gen(a, second, cache)
    assert stats.cached_prompt_tokens == [0]            # 96 < the CUDA default of 256 tokens
    cache.min_hit_tokens = 0
    for model in (a, b, a, b):
        out, stats = _gen(model, second, cache)
        assert torch.equal(out, _ref(model, second))
    assert stats.cached_prompt_tokens == [96]           # b's own blocks, never a's
    one_prompt = 3 * 96 * 2 * 2 * 16 * 4                # layers * tokens * (K, V) * heads * head_dim * fp32
    small = PrefixCache(max_bytes=one_prompt, block_size=16, offload_bytes=8 << 20, min_hit_tokens=0)
    _gen(a, first, small)
    _gen(b, first, small)                               # evicts a's blocks to pinned CPU memory
    out, stats = _gen(a, second, small)                 # a's blocks come back without a host wait
    assert torch.equal(out, _ref(a, second)) and stats.cached_prompt_tokens == [96]
    assert small.stats.reloads > 0
    q = PrefixCache(max_bytes=64 << 20, block_size=16, min_hit_tokens=0)
    for compile in (False, True):
        kw = dict(max_new_tokens=12, kv_quant="int8", compile=compile)
        for ids in (first, second):
            out, stats = specdec.generate(a, ids, prefix_cache=q, return_stats=True, **kw)
            assert torch.equal(out, specdec.generate(a, ids, **kw))
    assert stats.cached_prompt_tokens == [96]
