"""integrations.patch: a patched generate() equals the original's, falls back once, unpatches exactly."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import transformers
from transformers import GenerationConfig
from transformers.generation.streamers import BaseStreamer
from transformers.generation.utils import GenerateDecoderOnlyOutput

import specdec
from conftest import default_model_available, hf_greedy, prompts, tiny_model
from integrations import SpecdecFallbackWarning, is_patched, last_stats, patch, patched, unpatch


@pytest.fixture
def model():
    return tiny_model("llama")


@pytest.fixture
def batch():
    return prompts(3, [5, 12, 2], seed=4)


def _fallbacks(caught) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, SpecdecFallbackWarning)]


def test_positional_and_keyword_input_ids_equal_original(model, batch):
    ids, mask = batch
    ref = hf_greedy(model, ids, mask, 16)
    patch(model, prompt_lookup_num_tokens=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SpecdecFallbackWarning)
        assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False), ref)
        assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16), ref)
        assert torch.equal(model.generate(inputs=ids, attention_mask=mask, max_new_tokens=16), ref)
    assert last_stats(model).drafter == "prompt-lookup"


def test_per_call_drafters_override_the_patch(model, batch):
    ids, mask = batch
    ref = hf_greedy(model, ids, mask, 16)
    patch(model, draft_model="self:1")
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=16), ref)
    assert last_stats(model).drafter == "model"
    out = model.generate(ids, attention_mask=mask, max_new_tokens=16, prompt_lookup_num_tokens=3)
    assert torch.equal(out, ref) and last_stats(model).drafter == "prompt-lookup"
    patch(model, prompt_lookup_num_tokens=4)
    draft = tiny_model("llama", seed=5, layers=1)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=16, assistant_model=draft)
    assert torch.equal(out, ref) and last_stats(model).drafter == "model"


def test_generation_config_and_return_dict(model, batch):
    ids, mask = batch
    config = GenerationConfig(max_new_tokens=10, do_sample=False, pad_token_id=0)
    ref = model.generate(ids, config, attention_mask=mask)
    ref_dict = model.generate(ids, attention_mask=mask, max_new_tokens=10, return_dict_in_generate=True,
                              use_cache=False)
    patch(model, draft_model="self:2")
    assert torch.equal(model.generate(ids, config, attention_mask=mask), ref)
    assert torch.equal(model.generate(ids, generation_config=config, attention_mask=mask), ref)
    before = last_stats(model)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=10, return_dict_in_generate=True,
                         use_cache=False)
    assert type(out) is type(ref_dict) is GenerateDecoderOnlyOutput and last_stats(model) is not before
    assert torch.equal(out.sequences, ref_dict.sequences) and out.past_key_values is ref_dict.past_key_values is None


def test_missing_attention_mask_is_inferred_from_padding_like_hf(model, batch):
    ids, _ = batch  # left-padded with pad id 0, no mask: HF masks the pad positions
    ref = model.generate(ids, max_new_tokens=12, do_sample=False)
    patch(model, prompt_lookup_num_tokens=4)
    assert torch.equal(model.generate(ids, max_new_tokens=12, do_sample=False), ref)


class _Collect(BaseStreamer):
    def __init__(self):
        self.tokens, self.ended = [], False

    def put(self, value):
        self.tokens += value.flatten().tolist()

    def end(self):
        self.ended = True


def test_streamer_passes_through(model):
    ids, mask = prompts(1, [7], seed=2)
    ref_stream = _Collect()
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=12, streamer=ref_stream)
    patch(model, draft_model="self:1", num_draft_tokens=3)
    stream = _Collect()
    out = model.generate(ids, attention_mask=mask, max_new_tokens=12, streamer=stream)
    assert torch.equal(out, ref) and stream.ended and stream.tokens == ref_stream.tokens == out[0].tolist()


def test_unpatch_restores_the_exact_original(model, batch):
    other = tiny_model("llama", seed=3)
    assert "generate" not in vars(model)
    patch(model, prompt_lookup_num_tokens=4)
    assert is_patched(model) and not is_patched(other)
    assert "generate" not in vars(other) and other.generate.__func__ is type(other).generate
    patch(model, draft_model="self:1")  # twice: new settings, same true original
    unpatch(model)
    assert "generate" not in vars(model) and not is_patched(model)
    assert model.generate.__func__ is type(model).generate
    unpatch(model)  # a no-op when not patched
    ids, mask = batch
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=8), hf_greedy(model, ids, mask, 8))


def test_unpatch_restores_an_instance_generate_that_was_there_before(model):
    def own(*args, **kwargs):
        return "own"

    model.generate = own
    patch(model, prompt_lookup_num_tokens=2)
    unpatch(model)
    assert vars(model)["generate"] is own


def test_beam_search_falls_back_with_one_warning(model, batch):
    ids, mask = batch
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=8, num_beams=2)
    patch(model, prompt_lookup_num_tokens=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=8, num_beams=2), ref)
    assert len(_fallbacks(caught)) == 1 and "num_beams" in _fallbacks(caught)[0]


def test_each_unsupported_option_falls_back_and_warns_once_per_model(model, batch):
    ids, mask = batch
    processors = transformers.LogitsProcessorList([transformers.generation.MinLengthLogitsProcessor(3, 5)])
    embeds = model.get_input_embeddings()(ids)
    calls = [
        dict(logits_processor=processors),
        dict(repetition_penalty=1.3),
        dict(output_scores=True, return_dict_in_generate=True),
        dict(max_time=100.0),
    ]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        refs = [model.generate(ids, attention_mask=mask, max_new_tokens=6, **c) for c in calls]
        ref_embeds = model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=6)
        patch(model, draft_model="self:1")
        for _ in range(2):
            for c, ref in zip(calls, refs):
                out = model.generate(ids, attention_mask=mask, max_new_tokens=6, **c)
                assert torch.equal(getattr(out, "sequences", out), getattr(ref, "sequences", ref)), c
            assert torch.equal(model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=6),
                               ref_embeds)
    messages = _fallbacks(caught)
    assert len(messages) == 5, messages
    for name in ("logits_processor", "repetition_penalty", "output_scores", "max_time", "inputs_embeds"):
        assert sum(name in m for m in messages) == 1, name
    second = tiny_model("llama")
    patch(second, draft_model="self:1")
    with pytest.warns(SpecdecFallbackWarning, match="repetition_penalty"):  # per patched model
        second.generate(ids, attention_mask=mask, max_new_tokens=4, repetition_penalty=1.3)


def test_patched_restores_on_exit_even_after_an_exception(model, batch):
    ids, mask = batch
    with patched(model, prompt_lookup_num_tokens=4) as m:
        assert m is model and is_patched(model)
    assert "generate" not in vars(model)
    with pytest.raises(RuntimeError, match="boom"):
        with patched(model, draft_model="self:1"):
            model.generate(ids, attention_mask=mask, max_new_tokens=4)
            raise RuntimeError("boom")
    assert "generate" not in vars(model) and model.generate.__func__ is type(model).generate
    patch(model, prompt_lookup_num_tokens=4)
    with patched(model, draft_model="self:1"):
        model.generate(ids, attention_mask=mask, max_new_tokens=4)
        assert last_stats(model).drafter == "model"
    model.generate(ids, attention_mask=mask, max_new_tokens=4)  # outer settings are back
    assert is_patched(model) and last_stats(model).drafter == "prompt-lookup"


def test_bad_settings_are_refused_at_patch_time(model):
    with pytest.raises(ValueError, match="not both"):
        patch(model, draft_model="self:1", prompt_lookup_num_tokens=4)
    with pytest.raises(ValueError, match="num_layers"):
        patch(model, draft_model="self:9")
    with pytest.raises(ValueError, match="kv_quant"):
        patch(model, kv_quant="int3")
    with pytest.raises(TypeError):
        patch(object())
    assert not is_patched(model)


def test_cache_namespace_callable_is_evaluated_per_call(model, batch, monkeypatch):
    ids, mask = batch
    seen, real = [], specdec.generate

    def spy(*args, **kwargs):
        seen.append((kwargs["cache_namespace"], kwargs["prefix_cache"]))
        return real(*args, **{**kwargs, "prefix_cache": None})

    monkeypatch.setattr(specdec, "generate", spy)
    from prefix_cache import PrefixCache

    store = PrefixCache(max_bytes=1 << 20)
    tenant = lambda input_ids, kw: f"t{int(input_ids[0, -1])}:{input_ids.shape[0]}:{kw['max_new_tokens']}"  # noqa
    patch(model, prefix_cache=store, cache_namespace=tenant)
    model.generate(ids, attention_mask=mask, max_new_tokens=3)
    model.generate(ids[1:], attention_mask=mask[1:], max_new_tokens=2)
    assert seen == [(f"t{int(ids[0, -1])}:3:3", store), (f"t{int(ids[1, -1])}:2:2", store)]
    patch(model, prefix_cache=store, cache_namespace="tenant-a")
    model.generate(ids, attention_mask=mask, max_new_tokens=3, cache_namespace="tenant-b")  # per call wins
    assert seen[-1] == ("tenant-b", store)


def test_prefix_cache_passes_through_and_hits(model):
    from prefix_cache import PrefixCache

    system = prompts(1, [40], seed=9)[0]
    turns = [torch.cat([system, prompts(1, [5], seed=s)[0]], dim=1) for s in (1, 2)]
    refs = [hf_greedy(model, t, torch.ones_like(t), 8) for t in turns]
    cache = PrefixCache(max_bytes=1 << 24, block_size=16)
    patch(model, prefix_cache=cache, cache_namespace="t1")
    outs = [model.generate(t, attention_mask=torch.ones_like(t), max_new_tokens=8) for t in turns]
    assert all(torch.equal(o, r) for o, r in zip(outs, refs))
    assert last_stats(model).cached_prompt_tokens[0] >= 32 and cache.stats.hits > 0


def test_deepcopy_of_a_patched_model_generates_with_the_copy(model, batch):
    ids, mask = batch
    patch(model, prompt_lookup_num_tokens=4)
    clone = copy.deepcopy(model)
    with torch.no_grad():
        clone.get_output_embeddings().weight.mul_(-1.0)
    out = clone.generate(ids, attention_mask=mask, max_new_tokens=8)
    assert last_stats(clone) is not None and last_stats(model) is None
    unpatch(clone)
    assert torch.equal(out, hf_greedy(clone, ids, mask, 8))


# ------------------------------------------------------------ the real default model in a pipeline

QUESTIONS = [
    "What is the capital of France?",
    "Why is the sky blue?",
    "How do plants make their food?",
    "What is the boiling point of water at sea level?",
    "Who wrote the play Romeo and Juliet?",
    "How many legs does a spider have?",
    "What does a thermometer measure?",
    "Why do we need to sleep?",
    "What is the largest planet in our solar system?",
    "How does a bicycle stay upright?",
]
PROMPTS = [f"Question: {q}\nAnswer:" for q in QUESTIONS]
GREEDY = dict(do_sample=False, max_new_tokens=24)

slow = pytest.mark.slow
needs_default = pytest.mark.skipif(not default_model_available(), reason="default model not installed")


@pytest.fixture(scope="module")
def pipe():
    from integrations.models import load_default

    model, tok = load_default()
    tok.padding_side = "left"
    return transformers.pipeline("text-generation", model=model, tokenizer=tok)


@pytest.fixture(scope="module")
def reference(pipe):
    """Unpatched outputs, computed once."""
    unpatch(pipe)
    return {
        "single": [pipe(p, **GREEDY) for p in PROMPTS],
        "batched": pipe(PROMPTS, batch_size=4, **GREEDY),
        "chat": pipe(_chats(), batch_size=2, **GREEDY),
    }


def _chats():
    system = {"role": "system", "content": "You are a concise, helpful assistant. Answer in one sentence."}
    return [[system, {"role": "user", "content": q}] for q in QUESTIONS[:4]]


@slow
@needs_default
def test_pipeline_single_prompts_equal_unpatched(pipe, reference):
    with patched(pipe, prompt_lookup_num_tokens=8):
        out = [pipe(p, **GREEDY) for p in PROMPTS]
        assert last_stats(pipe).drafter == "prompt-lookup"
    assert out == reference["single"]
    assert sum(len(o[0]["generated_text"]) > len(p) + 10 for o, p in zip(out, PROMPTS)) >= 5  # real answers


@slow
@needs_default
def test_pipeline_batched_equals_unpatched(pipe, reference):
    with warnings.catch_warnings():
        warnings.simplefilter("error", SpecdecFallbackWarning)
        with patched(pipe, draft_model="self:8"):
            out = pipe(PROMPTS, batch_size=4, **GREEDY)
            assert last_stats(pipe).drafter == "model"
    assert out == reference["batched"]


@slow
@needs_default
def test_pipeline_chat_equals_unpatched_and_hits_the_prefix_cache(pipe, reference):
    from prefix_cache import PrefixCache

    cache = PrefixCache(max_bytes=1 << 28)
    with patched(pipe, prompt_lookup_num_tokens=8, prefix_cache=cache):
        out = pipe(_chats(), batch_size=2, **GREEDY)
        cached = last_stats(pipe).cached_prompt_tokens
    assert out == reference["chat"]
    assert out[0][0]["generated_text"][-1]["role"] == "assistant"
    assert cache.stats.hits > 0 and min(cached) > 0  # the shared system prompt came from the cache
    assert not is_patched(pipe)


def test_a_dict_with_the_cache_comes_from_hf_generate(model, batch):
    """HF's dict carries past_key_values (use_cache on, the default), which specdec does not return:
    the patched model falls back to HF's generate for it (with a warning), so the cache is HF's own;
    specdec.generate refuses it and says how to get the dict without it."""
    from transformers import DynamicCache

    ids, mask = batch
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=6, return_dict_in_generate=True)
    assert isinstance(ref.past_key_values, DynamicCache)
    with patched(model, prompt_lookup_num_tokens=3):
        with pytest.warns(SpecdecFallbackWarning, match="return_dict_in_generate=True with use_cache"):
            out = model.generate(ids, attention_mask=mask, max_new_tokens=6, return_dict_in_generate=True)
    assert torch.equal(out.sequences, ref.sequences)
    assert out.past_key_values.get_seq_length() == ref.past_key_values.get_seq_length() == ref.sequences.shape[1] - 1
    for (k, v), (rk, rv) in zip(_layers(out.past_key_values), _layers(ref.past_key_values)):
        assert torch.allclose(k, rk) and torch.allclose(v, rv)
    with pytest.raises(specdec.UnsupportedOption, match="pass use_cache=False"):
        specdec.generate(model, ids, mask, max_new_tokens=6, return_dict_in_generate=True)


def _layers(cache) -> list:
    return [(layer.keys, layer.values) for layer in cache.layers]
