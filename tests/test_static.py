"""The fast path (specdec.static): static KV cache (+ CUDA graphs on a GPU) vs the eager loop."""

import warnings

import pytest
import torch
import transformers

import specdec
from conftest import VOCAB, hf_greedy, prompts, tiny_model
from specdec import static
from specdec.adapter import ModelRunner, crop


@pytest.fixture(scope="module")
def models():
    return {arch: tiny_model(arch) for arch in ("llama", "qwen2", "gpt2")}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_compile_greedy_identical_to_hf_and_eager(models, arch):
    target = models[arch]
    ids, mask = prompts(1, [11], seed=4)
    ref = hf_greedy(target, ids, mask, 20)
    cases = [dict(draft_model="self:1", num_draft_tokens=k) for k in (1, 4, "auto")]
    cases += [dict(prompt_lookup_num_tokens=4, num_draft_tokens=k) for k in (1, 4, "auto")] + [{}]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback for these architectures
        for kw in cases:
            fast = specdec.generate(target, ids, mask, max_new_tokens=20, compile=True, **kw)
            assert torch.equal(fast, ref), (arch, kw)
            if kw.get("num_draft_tokens") in (4, None):
                assert torch.equal(fast, specdec.generate(target, ids, mask, max_new_tokens=20, **kw)), (arch, kw)


def test_rejected_slots_are_overwritten(models):
    """A partial draft (the target's first 2 of 3 layers) gets some drafts rejected: each crop only
    lowers the length, and the next step overwrites the rejected slots."""
    target = models["llama"]
    draft = "self:2"
    ids, mask = prompts(1, [6], seed=9)
    ref = hf_greedy(target, ids, mask, 30)
    for k in (3, 6):
        out, stats = specdec.generate(target, ids, mask, draft_model=draft, num_draft_tokens=k, max_new_tokens=30,
                                      compile=True, return_stats=True)
        assert torch.equal(out, ref), k
        assert 0 < stats.acceptance_rate < 1  # there were rejected (then overwritten) slots


def test_crop_then_overwrite_matches_a_fresh_cache(models):
    model = models["llama"]
    runner = static.StaticRunner(model, 1, 64)
    cache = runner.new_cache()
    seq = torch.randint(3, VOCAB, (1, 12), generator=torch.Generator().manual_seed(0))
    ones = lambda n: torch.ones(1, n, dtype=torch.long)  # noqa: E731
    pos = lambda a, b: torch.arange(a, b)[None]  # noqa: E731
    runner.forward(seq[:, :6], ones(6), pos(0, 6), cache)
    wrong = (seq[:, 6:11] + 1) % VOCAB
    runner.forward(wrong, ones(11), pos(6, 11), cache)           # 5 slots, then 4 of them rejected
    crop(cache, 7)
    assert cache.get_seq_length() == 7
    got = runner.forward(seq[:, 7:12], ones(12), pos(7, 12), cache)
    # reference: the eager runner over the sequence with slot 6 = wrong[0], 7.. = seq[7:]
    eager = ModelRunner(model)
    ref_cache = eager.new_cache()
    prefix = torch.cat([seq[:, :6], wrong[:, :1]], dim=1)
    eager.forward(prefix, ones(7), pos(0, 7), ref_cache)
    want = eager.forward(seq[:, 7:12], ones(12), pos(7, 12), ref_cache)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert cache.get_seq_length() == 12
    cache.batch_select_indices(torch.tensor([0]))              # row 0 stays active: same answers
    assert cache.active_rows().tolist() == [0] and cache.kv(0)[0][0].shape[2] == 12


def test_left_padding_and_holes_in_the_key_mask(models):
    """Batch 2 straight through StaticRunner: padding and a masked hole match the eager runner."""
    model = models["qwen2"]
    ids, mask = prompts(2, [3, 8], seed=5)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    fast, slow = static.StaticRunner(model, 2, 32), ModelRunner(model)
    fc, sc = fast.new_cache(), slow.new_cache()
    a = fast.forward(ids, mask, positions, fc, last_only=True)
    b = slow.forward(ids, mask, positions, sc, last_only=True)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    step = torch.tensor([[5, 6], [7, 8]])
    key = torch.cat([mask, torch.tensor([[0, 1], [1, 1]])], dim=1)  # row 0: first new slot is a hole
    pos = torch.stack([positions[:, -1] + 1, positions[:, -1] + 2], dim=1)
    a = fast.forward(step, key, pos, fc)
    b = slow.forward(step, key, pos, sc)
    torch.testing.assert_close(a[1], b[1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(a[0, 1], b[0, 1], rtol=1e-4, atol=1e-4)  # the hole's own output is unused


def test_eager_attention_uses_an_additive_mask():
    model = tiny_model("llama")
    model.config._attn_implementation = "eager"
    ids, mask = prompts(1, [9], seed=2)
    out = specdec.generate(model, ids, mask, draft_model="self:1", num_draft_tokens=3, max_new_tokens=16,
                           compile=True)
    assert torch.equal(out, hf_greedy(model, ids, mask, 16))


def test_second_call_reuses_the_runner(models):
    model = models["llama"]
    ids, mask = prompts(1, [5], seed=3)
    first = specdec.generate(model, ids, mask, max_new_tokens=10, compile=True)
    runner = next(r for key, r in static._RUNNERS.items() if key[0] == id(model) and key[1] == "target")
    second = specdec.generate(model, ids, mask, max_new_tokens=12, compile=True)  # same 256-slot bucket
    again = next(r for key, r in static._RUNNERS.items() if key[0] == id(model) and key[1] == "target")
    assert again is runner and torch.equal(first, second[:, :first.shape[1]])


def test_runner_cache_is_dropped_with_the_model():
    model = tiny_model("llama", layers=1)
    static.static_runner(model, 1, 40)
    key = next(key for key in static._RUNNERS if key[0] == id(model))
    del model
    import gc

    gc.collect()
    assert key not in static._RUNNERS


def test_static_path_takes_the_cache_by_either_keyword(models):
    """transformers 5.2x renamed forward's ``past_key_values`` to ``cache`` (the old name a deprecated
    alias): the static runner must still run this version's models, not fall back to eager."""
    from specdec.adapter import cache_keyword

    class Old(torch.nn.Module):
        def forward(self, input_ids=None, past_key_values=None, position_ids=None, attention_mask=None):
            pass

    class New(Old):
        def forward(self, input_ids=None, cache=None, position_ids=None, attention_mask=None, **kwargs):
            pass

    assert (cache_keyword(Old()), cache_keyword(New()), cache_keyword(torch.nn.Linear(1, 1))) == \
        ("past_key_values", "cache", None)
    model = models["llama"]
    assert static.unsupported_reason(model) is None
    ids, mask = prompts(1, [6], seed=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback to eager warns
        assert torch.equal(specdec.generate(model, ids, mask, max_new_tokens=8, compile=True),
                           hf_greedy(model, ids, mask, 8))


def test_unsupported_falls_back_with_a_warning():
    config = transformers.MistralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, sliding_window=4)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    model.generation_config.eos_token_id = None
    ids, mask = prompts(1, [7], seed=1)
    static._WARNED.clear()
    with pytest.warns(RuntimeWarning, match="falls back to the eager runner"):
        fast = specdec.generate(model, ids, mask, max_new_tokens=12, compile=True)
    assert torch.equal(fast, specdec.generate(model, ids, mask, max_new_tokens=12))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_graphs_identical_fp32_and_captured_once():
    model = tiny_model("llama").cuda()
    ids, mask = (t.cuda() for t in prompts(1, [13], seed=6))
    # fixed k: "auto" picks k from timings, and a k not seen before captures its graph then
    same_shapes = ({}, dict(draft_model=model, num_draft_tokens=4), dict(prompt_lookup_num_tokens=4, num_draft_tokens=4))
    for kw in same_shapes + (dict(draft_model="self:1", num_draft_tokens=4), dict(prompt_lookup_num_tokens=4)):
        slow = specdec.generate(model, ids, mask, max_new_tokens=40, **kw)
        fast = specdec.generate(model, ids, mask, max_new_tokens=40, compile=True, **kw)
        assert torch.equal(fast, slow), kw
    before = static.captures
    assert before > 0
    for kw in same_shapes:
        specdec.generate(model, ids, mask, max_new_tokens=40, compile=True, **kw)
    assert static.captures == before  # the second call of each kind captured nothing


def test_compile_mode_must_be_known(models):
    ids, mask = prompts(1, [4])
    with pytest.raises(ValueError, match="compile must be False, True, 'graphs' or 'inductor'"):
        specdec.generate(models["llama"], ids, mask, max_new_tokens=4, compile="fast")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_inductor_identical_fp32_and_compiled_twice_at_most():
    model = tiny_model("llama").cuda()
    ids, mask = (t.cuda() for t in prompts(1, [13], seed=7))
    for kw in ({}, dict(draft_model="self:1", num_draft_tokens=4), dict(prompt_lookup_num_tokens=4, num_draft_tokens=4)):
        slow = specdec.generate(model, ids, mask, max_new_tokens=40, **kw)
        fast = specdec.generate(model, ids, mask, max_new_tokens=40, compile="inductor", **kw)
        assert torch.equal(fast, slow), kw
    before = static.captures
    specdec.generate(model, ids, mask, max_new_tokens=40, compile="inductor", draft_model="self:1", num_draft_tokens=4)
    assert static.captures == before


def _prefix_cache_calls(model, device, **kw):
    """Two prompts sharing a 40-token prefix, each with and without a prefix cache, compile=True."""
    from prefix_cache import PrefixCache

    cache = PrefixCache(max_bytes=1 << 26, block_size=4, min_hit_tokens=0)  # a 40-token hit counts on CUDA too
    g = torch.Generator().manual_seed(11)
    shared = torch.randint(3, VOCAB, (1, 40), generator=g)
    for q in (torch.randint(3, VOCAB, (1, 20), generator=g), torch.randint(3, VOCAB, (1, 13), generator=g)):
        ids = torch.cat([shared, q], dim=1).to(device)
        want = hf_greedy(model, ids, torch.ones_like(ids), 12)
        got, stats = specdec.generate(model, ids, max_new_tokens=12, compile=True, prefix_cache=cache,
                                      return_stats=True, **kw)
        assert torch.equal(got, want), kw
        yield stats.cached_prompt_tokens[0]


@pytest.mark.parametrize("kw", [{}, dict(draft_model="self:1", num_draft_tokens=3)])
def test_compile_with_prefix_cache_identical_and_hits(models, kw):
    cached = list(_prefix_cache_calls(models["llama"], "cpu", **kw))
    assert cached[0] == 0 and cached[1] >= 40          # the second call prefilled only its suffix


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_graphs_with_prefix_cache_run_the_suffix_as_a_padded_graph():
    model = tiny_model("llama").cuda()
    before = static.captures
    cached = list(_prefix_cache_calls(model, "cuda"))
    assert cached[1] >= 40 and static.captures > before


@pytest.mark.parametrize("kw", [{}, dict(draft_model="self:1", num_draft_tokens=3),
                                dict(prompt_lookup_num_tokens=3, num_draft_tokens=3)])
def test_compile_batch_identical_while_rows_finish_at_different_times(models, kw):
    model = models["llama"]
    ids, mask = prompts(3, [5, 9, 7], seed=3)
    free = hf_greedy(model, ids, mask, 16)
    eos = int(free[1, ids.shape[1] + 4])                 # row 1 stops early, the others may later
    want = hf_greedy(model, ids, mask, 16, eos_token_id=eos, pad_token_id=0)
    got = specdec.generate(model, ids, mask, max_new_tokens=16, eos_token_id=eos, pad_token_id=0,
                           compile=True, **kw)
    assert torch.equal(got, want), kw


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_graphs_batch_identical_fp32():
    model = tiny_model("llama").cuda()
    ids, mask = (t.cuda() for t in prompts(4, [5, 13, 9, 7], seed=8))
    for kw in ({}, dict(draft_model="self:1", num_draft_tokens=4)):
        slow = specdec.generate(model, ids, mask, max_new_tokens=30, eos_token_id=7, pad_token_id=0, **kw)
        fast = specdec.generate(model, ids, mask, max_new_tokens=30, eos_token_id=7, pad_token_id=0,
                                compile=True, **kw)
        assert torch.equal(fast, slow), kw


def test_compile_batch_with_prefix_cache_rows_hitting_different_prefixes(models):
    from prefix_cache import PrefixCache

    model = models["llama"]
    g = torch.Generator().manual_seed(21)
    a, b = torch.randint(3, VOCAB, (1, 24), generator=g), torch.randint(3, VOCAB, (1, 16), generator=g)
    cache = PrefixCache(max_bytes=1 << 26, block_size=4)
    specdec.generate(model, a, max_new_tokens=2, prefix_cache=cache)
    specdec.generate(model, b, max_new_tokens=2, prefix_cache=cache)
    rows = [torch.cat([a[0], torch.randint(3, VOCAB, (5,), generator=g)]),
            torch.cat([b[0], torch.randint(3, VOCAB, (9,), generator=g)])]
    width = max(len(r) for r in rows)
    ids = torch.stack([torch.cat([torch.zeros(width - len(r), dtype=torch.long), r]) for r in rows])
    mask = torch.stack([torch.cat([torch.zeros(width - len(r), dtype=torch.long), torch.ones(len(r), dtype=torch.long)])
                        for r in rows])
    want = hf_greedy(model, ids, mask, 10)
    got, stats = specdec.generate(model, ids, mask, max_new_tokens=10, compile=True, prefix_cache=cache,
                                  return_stats=True)
    assert torch.equal(got, want)
    assert min(stats.cached_prompt_tokens) > 0


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_static_cache_close_to_full_precision_and_smaller(models, bits):
    model = models["llama"]
    seq = torch.randint(3, VOCAB, (1, 20), generator=torch.Generator().manual_seed(5))
    ones = lambda n: torch.ones(1, n, dtype=torch.long)  # noqa: E731
    pos = lambda a, b: torch.arange(a, b)[None]  # noqa: E731
    outs = {}
    for kv_bits in (None, bits):
        runner = static.StaticRunner(model, 1, 64, kv_bits=kv_bits)
        cache = runner.new_cache()
        runner.forward(seq[:, :12], ones(12), pos(0, 12), cache)            # prefill (quantized on the way in)
        runner.forward(seq[:, 12:17], ones(17), pos(12, 17), cache)         # a 5-token verify
        crop(cache, 14)                                                     # 3 rejected: overwritten next
        outs[kv_bits] = runner.forward(seq[:, 14:20], ones(20), pos(14, 20), cache)
        if kv_bits:
            layer = runner._hf_cache.layers[0]
            assert not layer.is_initialized                                 # no full-precision K/V buffers
            codes = sum(t.numel() * t.element_size() for q in layer.codes for t in q)
            full = 2 * layer.codes[0].data.shape[1] * 64 * model.config.head_dim * 4   # fp32 K + V, 64 slots
            assert codes <= (0.375 if bits == 8 else 0.25) * full  # head_dim 16: one scale/zero per head
    tol = 0.05 if bits == 8 else 0.5
    torch.testing.assert_close(outs[bits], outs[None], rtol=0, atol=tol)


def test_compile_with_kv_quant_runs_drafts_and_batches(models):
    model = models["llama"]
    ids, mask = prompts(2, [6, 9], seed=4)
    for kv in ("int8", "int4"):
        for kw in ({}, dict(draft_model="self:1", num_draft_tokens=3)):
            out = specdec.generate(model, ids, mask, max_new_tokens=12, compile=True, kv_quant=kv, **kw)
            assert out.shape == (2, ids.shape[1] + 12)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kv_bits", [None, 8, 4])
def test_gpu_graph_replay_equals_eager_static_forward(kv_bits):
    model = tiny_model("llama").cuda()
    seq = torch.randint(3, VOCAB, (2, 300), generator=torch.Generator().manual_seed(9)).cuda()
    ones = lambda n: torch.ones(2, n, dtype=torch.long, device="cuda")  # noqa: E731
    pos = lambda a, b: torch.arange(a, b, device="cuda")[None].expand(2, -1)  # noqa: E731
    outs = []
    for graphs in (False, True):
        runner = static.StaticRunner(model, 2, 512, use_graphs=graphs, graph_max_tokens=4, kv_bits=kv_bits)
        runner.capture_all()
        cache = runner.new_cache()
        runner.forward(seq[:, :250], ones(250), pos(0, 250), cache)
        steps = [runner.forward(seq[:, i:i + 3], ones(i + 3), pos(i, i + 3), cache) for i in range(250, 280, 3)]
        outs.append(torch.cat(steps, dim=1))                # crosses the 256-slot attention window
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-4)


def test_a_draft_that_has_not_run_yet_learns_which_rows_finished(models):
    # auto k decodes plainly first: rows can finish before the draft's first forward, and its
    # (still empty) static cache must then run the remaining rows only
    from specdec.drafters import ModelDrafter

    draft = ModelDrafter(models["llama"], VOCAB)
    draft.runner = static.static_runner(models["llama"], 4, 64, "draft", graph_max_tokens=8)
    try:
        draft.cache = draft.runner.new_cache()
        draft.select_rows(torch.tensor([2]))
        assert draft.cache.active_rows().tolist() == [2]
        ids = torch.randint(3, VOCAB, (1, 5))
        logits = draft.runner.forward(ids, torch.ones(1, 5, dtype=torch.long), torch.arange(5)[None], draft.cache)
        assert logits.shape[0] == 1
    finally:
        static.give_back(draft.runner)
