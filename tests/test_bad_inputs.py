"""Bad inputs: one table of what users get wrong and the error each gets, plus the documented fallbacks.

Every row names the API, the bad input, the exception type and a regex its message must match
(the argument's name and what to do). The table in docs/errors.md lists these cases.
"""

from __future__ import annotations

import contextlib
import functools
import io
import re
import sys
import warnings
from pathlib import Path
from typing import Callable, NamedTuple

import pytest
import torch
import transformers
from torch import nn

import specdec
from conftest import VOCAB, hf_greedy, prompts, tiny_model
from integrations import SpecdecFallbackWarning, last_stats, patch, patched
from prefix_cache import PrefixCache
from quant import quantize
from specdec import cli


class Case(NamedTuple):
    api: str                  # which public entry point
    bad: str                  # the bad input, in words (docs/errors.md column)
    call: Callable[[], object]
    error: type[BaseException]
    match: str                # regex over the message (and stderr, for the CLI)


@functools.cache
def llama():
    return tiny_model("llama")


@functools.cache
def gpt2():
    return tiny_model("gpt2", layers=1)


@functools.cache
def nan_model():
    """A model whose logits are all NaN (as after a float16 overflow)."""
    model = tiny_model("llama", layers=1)
    with torch.no_grad():
        model.lm_head.weight.fill_(float("nan"))
    return model


def ids(n: int = 5, batch: int = 1):
    return prompts(batch, [n] * batch)[0]


def gen(*args, **kwargs):
    """specdec.generate on the tiny llama with a short prompt; arguments override."""
    if not args:
        args = (llama(), ids())
    return specdec.generate(*args, **{"max_new_tokens": 4, **kwargs})


def small_vocab_draft():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB // 2, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1)).eval()


def meta_model():
    with torch.device("meta"):
        return transformers.LlamaForCausalLM(llama().config)


def sliding_window_model():
    config = transformers.MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, sliding_window=16)
    return transformers.MistralForCausalLM(config).eval()


class NoPut:
    def end(self):
        pass


def fake_kv(n: int, batch: int = 1):
    return [(torch.zeros(batch, 2, n, 4), torch.zeros(batch, 2, n, 4)) for _ in range(2)]


def released_match_kv():
    cache = PrefixCache(max_bytes=1 << 20, block_size=4)
    cache.insert(list(range(8)), fake_kv(8))
    hit = cache.match(list(range(9)))
    hit.release()
    return hit.kv()


def namespace_returning_int():
    model = llama()
    with patched(model, prefix_cache=PrefixCache(max_bytes=1 << 20), cache_namespace=lambda ids, kw: 42):
        return model.generate(ids(), attention_mask=torch.ones(1, 5, dtype=torch.long), max_new_tokens=2)


class LinearSubclass(nn.Linear):
    pass


def cli_run(*argv):
    sys.exit(cli.main(list(argv)))


G, P, C, Q, CLI = "specdec.generate", "patch", "PrefixCache", "quantize", "specdec CLI"
MASK = torch.ones(1, 5, dtype=torch.long)

CASES = {
    # ---- specdec.generate: the prompt
    "ids_list": Case(G, "input_ids a Python list", lambda: gen(llama(), [[1, 2, 3]]),
                     ValueError, r"input_ids must be a torch\.LongTensor"),
    "ids_float": Case(G, "input_ids float", lambda: gen(llama(), torch.ones(1, 4)),
                      ValueError, r"input_ids must be an integer .*return_tensors='pt'"),
    "ids_3d": Case(G, "input_ids 3-D", lambda: gen(llama(), torch.ones(1, 2, 3, dtype=torch.long)),
                   ValueError, r"input_ids must be .*shape \(batch, length\)"),
    "ids_empty": Case(G, "empty prompt (1, 0)", lambda: gen(llama(), torch.zeros(1, 0, dtype=torch.long)),
                      ValueError, r"input_ids is empty: give at least one prompt token"),
    "ids_over_vocab": Case(G, "id >= vocabulary size", lambda: gen(llama(), torch.tensor([[1, VOCAB + 5]])),
                           ValueError, r"input_ids hold ids outside the model's vocabulary \[0, 96\)"),
    "ids_negative": Case(G, "negative id", lambda: gen(llama(), torch.tensor([[-1, 4]])),
                         ValueError, r"input_ids hold ids outside the model's vocabulary.*tokenized for this model"),
    "ids_too_long": Case(G, "prompt + max_new_tokens past a learned position table (GPT-2)",
                         lambda: gen(gpt2(), ids(500), max_new_tokens=20),
                         ValueError, r"prompt \(500 tokens\) \+ max_new_tokens \(20\).*max_position_embeddings"),
    "namespace_surrogate": Case(G, "cache_namespace='\\ud800' (not UTF-8)",
                                lambda: gen(prefix_cache=PrefixCache(1 << 20, 4), cache_namespace="\ud800"),
                                ValueError, r"namespace must be encodable as UTF-8"),
    "mask_list": Case(G, "attention_mask a list", lambda: gen(llama(), ids(), [[1] * 5]),
                      ValueError, r"attention_mask must be a tensor"),
    "mask_shape": Case(G, "attention_mask shape != input_ids shape", lambda: gen(llama(), ids(), torch.ones(1, 4)),
                       ValueError, r"attention_mask shape \(1, 4\) != input_ids shape \(1, 5\)"),
    "mask_values": Case(G, "attention_mask values other than 0/1", lambda: gen(llama(), ids(), MASK * 2),
                        ValueError, r"attention_mask must hold only 0 \(padding\) and 1"),
    "mask_zero_row": Case(G, "attention_mask row all zeros", lambda: gen(llama(), ids(), MASK * 0),
                          ValueError, r"a row of attention_mask is all zeros"),
    "mask_right_pad": Case(G, "right-padded batch", lambda: gen(llama(), ids(), torch.tensor([[1, 1, 1, 0, 0]])),
                           ValueError, r"attention_mask has right padding.*padding_side = 'left'"),
    # ---- specdec.generate: the models
    "model_not_lm": Case(G, "model is not a model (a string)", lambda: gen("gpt2", ids()),
                         TypeError, r"model must be a Hugging Face causal LM"),
    "model_meta": Case(G, "model weights on the meta device", lambda: gen(meta_model(), ids()),
                       ValueError, r"model's weights are on the meta device.*from_pretrained"),
    "model_nan": Case(G, "model producing NaN logits (greedy)", lambda: gen(nan_model(), ids()),
                      FloatingPointError, r"model produced NaN/inf logits.*bfloat16 or float32"),
    "model_nan_sampling": Case(G, "model producing NaN logits (sampling)",
                               lambda: gen(nan_model(), ids(), do_sample=True),
                               FloatingPointError, r"model produced NaN/inf logits"),
    "draft_small_vocab": Case(G, "draft vocabulary smaller than the target's",
                              lambda: gen(draft_model=small_vocab_draft()),
                              ValueError, r"draft's vocabulary \(48\) is smaller than the target's \(96\).*tokenizer"),
    "draft_not_lm": Case(G, "draft_model=5", lambda: gen(draft_model=5),
                         TypeError, r"draft_model must be a causal LM .*'self:N'"),
    "draft_bad_string": Case(G, "draft_model='self:x'", lambda: gen(draft_model="self:x"),
                             ValueError, r"draft_model='self:x': a string must be 'self:N'"),
    "draft_too_deep": Case(G, "draft_model='self:9' (target has 3 layers)", lambda: gen(draft_model="self:9"),
                           ValueError, r"num_layers must be in 1\.\.2 for a 3-layer target"),
    "draft_and_assistant": Case(G, "draft_model and assistant_model", lambda: gen(draft_model="self:1",
                                                                                 assistant_model=llama()),
                                ValueError, r"pass draft_model= or assistant_model=.*not both"),
    "draft_and_lookup": Case(G, "draft_model and prompt_lookup_num_tokens",
                             lambda: gen(draft_model="self:1", prompt_lookup_num_tokens=3),
                             ValueError, r"either draft_model= or prompt_lookup_num_tokens=, not both"),
    # ---- specdec.generate: budgets and draft lengths
    "k_zero": Case(G, "num_draft_tokens=0", lambda: gen(draft_model="self:1", num_draft_tokens=0),
                   ValueError, r"num_draft_tokens must be an int >= 1 or 'auto', got 0"),
    "k_negative": Case(G, "num_draft_tokens=-2", lambda: gen(draft_model="self:1", num_draft_tokens=-2),
                       ValueError, r"num_draft_tokens must be an int >= 1"),
    "k_string": Case(G, "num_draft_tokens='fast'", lambda: gen(draft_model="self:1", num_draft_tokens="fast"),
                     ValueError, r"num_draft_tokens must be an int >= 1 or 'auto'"),
    "lookup_zero": Case(G, "prompt_lookup_num_tokens=0", lambda: gen(prompt_lookup_num_tokens=0),
                        ValueError, r"prompt_lookup_num_tokens must be an int >= 1"),
    "budget_zero": Case(G, "max_new_tokens=0", lambda: gen(max_new_tokens=0),
                        ValueError, r"max_new_tokens must be >= 1"),
    "budget_negative": Case(G, "max_new_tokens=-1", lambda: gen(max_new_tokens=-1),
                            ValueError, r"max_new_tokens must be >= 1"),
    "budget_float": Case(G, "max_new_tokens=2.5", lambda: gen(max_new_tokens=2.5),
                         TypeError, r"max_new_tokens must be an int"),
    "budget_max_length": Case(G, "max_length <= prompt length", lambda: gen(max_new_tokens=None, max_length=3),
                              ValueError, r"max_new_tokens must be >= 1.*max_length=3 with a 5-token prompt"),
    # ---- specdec.generate: options
    "unknown_keyword": Case(G, "unknown keyword (typo)", lambda: gen(max_new_token=3),
                            TypeError, r"unexpected keyword argument 'max_new_token'"),
    "beams": Case(G, "num_beams=2", lambda: gen(num_beams=2),
                  ValueError, r"cannot honour num_beams=2.*original generate\(\)"),
    "output_scores": Case(G, "output_scores=True", lambda: gen(output_scores=True, return_dict_in_generate=True),
                          ValueError, r"cannot honour output_scores=True"),
    "temperature_zero": Case(G, "do_sample with temperature=0", lambda: gen(do_sample=True, temperature=0.0),
                             ValueError, r"temperature must be > 0 when sampling.*do_sample=False"),
    "top_p": Case(G, "top_p=1.5", lambda: gen(do_sample=True, top_p=1.5),
                  ValueError, r"top_p must be in \(0, 1\]"),
    "top_k": Case(G, "top_k=-1", lambda: gen(do_sample=True, top_k=-1),
                  ValueError, r"top_k must be >= 0"),
    "generation_config_dict": Case(G, "generation_config a dict", lambda: gen(generation_config={"top_k": 3}),
                                   TypeError, r"generation_config must be a transformers\.GenerationConfig"),
    "stop_no_tokenizer": Case(G, "stop_strings without tokenizer", lambda: gen(stop_strings=["x"]),
                              ValueError, r"stop_strings needs tokenizer="),
    "streamer_batch": Case(G, "streamer with batch size 2",
                           lambda: gen(llama(), ids(batch=2), streamer=transformers.TextStreamer(None)),
                           ValueError, r"streamers support batch size 1"),
    "streamer_no_put": Case(G, "streamer without put()", lambda: gen(streamer=NoPut()),
                            TypeError, r"streamer must have put\(token_ids\) and end\(\)"),
    "generator_int": Case(G, "generator=0 (a seed)", lambda: gen(do_sample=True, generator=0),
                          TypeError, r"generator must be a torch\.Generator.*manual_seed"),
    "kv_quant": Case(G, "kv_quant='int3'", lambda: gen(kv_quant="int3"),
                     ValueError, r"kv_quant must be None, 'int8' or 'int4'"),
    "prefix_cache_type": Case(G, "prefix_cache={}", lambda: gen(prefix_cache={}),
                              TypeError, r"prefix_cache must be a prefix_cache\.PrefixCache"),
    "prefix_cache_sliding": Case(G, "prefix_cache with a sliding-window model",
                                 lambda: gen(sliding_window_model(), ids(), prefix_cache=PrefixCache(1 << 20)),
                                 ValueError, r"sliding"),
    "namespace_int": Case(G, "cache_namespace=5", lambda: gen(prefix_cache=PrefixCache(1 << 20), cache_namespace=5),
                          TypeError, r"cache_namespace must be a str \(a tenant key\) or None"),
    # ---- integrations.patch
    "patch_object": Case(P, "patch(object())", lambda: patch(object()),
                         TypeError, r"cannot patch a object: pass a PreTrainedModel or a transformers Pipeline"),
    "patch_both_drafters": Case(P, "draft_model and prompt_lookup_num_tokens",
                                lambda: patch(llama(), draft_model="self:1", prompt_lookup_num_tokens=4),
                                ValueError, r"either draft_model= or prompt_lookup_num_tokens=, not both"),
    "patch_k_zero": Case(P, "num_draft_tokens=0", lambda: patch(llama(), num_draft_tokens=0),
                         ValueError, r"num_draft_tokens must be an int >= 1"),
    "patch_lookup_zero": Case(P, "prompt_lookup_num_tokens=0", lambda: patch(llama(), prompt_lookup_num_tokens=0),
                              ValueError, r"prompt_lookup_num_tokens must be an int >= 1"),
    "patch_draft_type": Case(P, "draft_model=3.0", lambda: patch(llama(), draft_model=3.0),
                             TypeError, r"draft_model must be a causal LM or 'self:N'"),
    "patch_self_too_deep": Case(P, "draft_model='self:9'", lambda: patch(llama(), draft_model="self:9"),
                                ValueError, r"num_layers must be in 1\.\.2"),
    "patch_kv_quant": Case(P, "kv_quant='fp8'", lambda: patch(llama(), kv_quant="fp8"),
                           ValueError, r"kv_quant must be None, 'int8' or 'int4'"),
    "patch_namespace_type": Case(P, "cache_namespace=5", lambda: patch(llama(), cache_namespace=5),
                                 TypeError, r"cache_namespace must be a string or a callable"),
    "patch_namespace_returns_int": Case(P, "cache_namespace callable returning an int", namespace_returning_int,
                                        TypeError, r"cache_namespace callable returned int.*must return a str"),
    "patch_unknown_keyword": Case(P, "unknown keyword", lambda: patch(llama(), prefix_caches=None),
                                  TypeError, r"unexpected keyword argument 'prefix_caches'"),
    # ---- prefix_cache.PrefixCache
    "cache_zero_bytes": Case(C, "max_bytes=0", lambda: PrefixCache(max_bytes=0),
                             ValueError, r"max_bytes must be > 0.*2 << 30"),
    "cache_string_bytes": Case(C, "max_bytes='2GB'", lambda: PrefixCache(max_bytes="2GB"),
                               TypeError, r"max_bytes must be a number.*2 << 30"),
    "cache_fraction_bytes": Case(C, "max_bytes=0.5", lambda: PrefixCache(max_bytes=0.5),
                                 ValueError, r"max_bytes must be a whole number of bytes, got 0\.5"),
    "cache_infinite_bytes": Case(C, "max_bytes=float('inf')", lambda: PrefixCache(max_bytes=float("inf")),
                                 ValueError, r"max_bytes must be finite, got inf.*2 << 30"),
    "cache_fraction_block": Case(C, "block_size=1.5", lambda: PrefixCache(max_bytes=1 << 20, block_size=1.5),
                                 ValueError, r"block_size must be a whole number of tokens, got 1\.5"),
    "cache_infinite_offload": Case(C, "offload_bytes=float('inf')",
                                   lambda: PrefixCache(max_bytes=1 << 20, offload_bytes=float("inf")),
                                   ValueError, r"offload_bytes must be finite"),
    "cache_namespace_surrogate": Case(C, "match(namespace='\\ud800') (not UTF-8)",
                                      lambda: PrefixCache(1 << 20, 4).match(list(range(9)), "\ud800"),
                                      ValueError, r"namespace must be encodable as UTF-8.*'\\ud800'"),
    "cache_block_zero": Case(C, "block_size=0", lambda: PrefixCache(max_bytes=1 << 20, block_size=0),
                             ValueError, r"block_size must be >= 1 token"),
    "cache_offload_negative": Case(C, "offload_bytes=-1", lambda: PrefixCache(max_bytes=1 << 20, offload_bytes=-1),
                                   ValueError, r"offload_bytes must be >= 0"),
    "cache_match_2d": Case(C, "match() of a 2-D tensor", lambda: PrefixCache(1 << 20).match(torch.ones(1, 4).long()),
                           ValueError, r"token_ids must be a 1-D integer tensor \(select one row first\)"),
    "cache_insert_floats": Case(C, "insert() of float ids", lambda: PrefixCache(1 << 20).insert([0.5] * 4, fake_kv(4)),
                                ValueError, r"token_ids must be integers.*not text or logits"),
    "cache_insert_short_kv": Case(C, "insert() with fewer K/V positions than ids",
                                  lambda: PrefixCache(1 << 20).insert(list(range(8)), fake_kv(6)),
                                  ValueError, r"kv_layers hold 6 positions but 8 token ids.*token_ids\[:6\]"),
    "cache_insert_batch": Case(C, "insert() of a batch-2 K/V",
                               lambda: PrefixCache(1 << 20).insert(list(range(4)), fake_kv(4, batch=2)),
                               ValueError, r"batch size is 2, must be 1.*kv_from_cache\(cache, row=r\)"),
    "cache_namespace_type": Case(C, "match(namespace=5)", lambda: PrefixCache(1 << 20, 4).match(list(range(9)), 5),
                                 ValueError, r"namespace must be a str or None"),
    "cache_min_hit_negative": Case(C, "min_hit_tokens=-1", lambda: PrefixCache(1 << 20, min_hit_tokens=-1),
                                   ValueError, r"min_hit_tokens must be >= 0 tokens"),
    "cache_model_key_empty": Case(C, "set_model_key(model, '')", lambda: PrefixCache(1 << 20).set_model_key(llama(), ""),
                                  ValueError, r"model_key must be a non-empty str naming the weights"),
    "cache_match_model_int": Case(C, "match(model=5)", lambda: PrefixCache(1 << 20).match([1, 2], model=5),
                                  TypeError, r"model must be the torch\.nn\.Module that computed the K/V"),
    "cache_kv_after_release": Case(C, "kv() after release()", released_match_kv,
                                   RuntimeError, r"kv\(\) after release\(\): read the K/V before releasing"),
    # ---- quant.quantize
    "quant_bits": Case(Q, "bits=3", lambda: quantize(nn.Linear(64, 8), bits=3),
                       ValueError, r"bits must be 8 or 4, got 3"),
    "quant_group": Case(Q, "bits=4, group_size=48", lambda: quantize(nn.Linear(64, 8), bits=4, group_size=48),
                        ValueError, r"group_size must be one of"),
    "quant_backend": Case(Q, "backend='tinygemm' with bits=8", lambda: quantize(nn.Linear(64, 8), backend="tinygemm"),
                          ValueError, r"backend for bits=8 must be one of"),
    "quant_not_module": Case(Q, "model is not a module (a string)", lambda: quantize("gpt2"),
                             TypeError, r"model must be a torch\.nn\.Module"),
    "quant_indivisible": Case(Q, "in_features not divisible by group_size",
                              lambda: quantize(nn.Sequential(nn.Linear(96, 8)), bits=4, group_size=64),
                              ValueError, r"layer '0': in_features=96 is not divisible by group_size=64.*skip="),
    "quant_subclass": Case(Q, "a subclass of nn.Linear", lambda: quantize(nn.Sequential(LinearSubclass(64, 8))),
                           ValueError, r"layer '0' is a LinearSubclass.*add '0' to skip="),
    "quant_no_linear": Case(Q, "a model without nn.Linear layers", lambda: quantize(nn.Sequential(nn.Conv2d(1, 1, 1))),
                            ValueError, r"no nn\.Linear layers to quantize"),
    # ---- the specdec command (argument errors exit with status 2 before any model loads)
    "cli_command": Case(CLI, "unknown command", lambda: cli_run("frobnicate"),
                        SystemExit, r"unknown command 'frobnicate'"),
    "cli_empty_prompt": Case(CLI, "empty prompt", lambda: cli_run("generate", " "),
                             SystemExit, r"argument prompt: the prompt is empty"),
    "cli_k_zero": Case(CLI, "--k 0", lambda: cli_run("generate", "hi", "--k", "0"),
                       SystemExit, r"argument --k: '0': give an int >= 1 or 'auto'"),
    "cli_k_word": Case(CLI, "--k fast", lambda: cli_run("generate", "hi", "--k", "fast"),
                       SystemExit, r"argument --k: 'fast'"),
    "cli_budget": Case(CLI, "--max-new-tokens 0", lambda: cli_run("generate", "hi", "--max-new-tokens", "0"),
                       SystemExit, r"argument --max-new-tokens: '0': must be > 0"),
    "cli_temperature": Case(CLI, "--temperature 0", lambda: cli_run("generate", "hi", "--temperature", "0"),
                            SystemExit, r"argument --temperature: '0': must be > 0"),
    "cli_top_p": Case(CLI, "--top-p 1.5", lambda: cli_run("generate", "hi", "--top-p", "1.5"),
                      SystemExit, r"argument --top-p: '1\.5': must be in \(0, 1\]"),
    "cli_device": Case(CLI, "--device tpu", lambda: cli_run("generate", "hi", "--device", "tpu"),
                       SystemExit, r"argument --device: 'tpu' is not a torch device"),
    "cli_dtype": Case(CLI, "--dtype float33", lambda: cli_run("generate", "hi", "--dtype", "float33"),
                      SystemExit, r"argument --dtype: invalid choice: 'float33'"),
    "cli_target": Case(CLI, "--target pointing nowhere",
                       lambda: cli_run("generate", "hi", "--target", "/nonexistent/model.gguf", "--device", "cpu"),
                       FileNotFoundError, r"no GGUF file at /nonexistent/model\.gguf"),
}


def test_the_table_is_big_enough():
    assert len(CASES) >= 30 and len({c.api for c in CASES.values()}) == 5


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gets_a_clear_error(name, capsys):
    case = CASES[name]
    with pytest.raises(case.error) as info:
        case.call()
    text = str(info.value) + capsys.readouterr().err
    assert re.search(case.match, text, re.S), text


# ---------------------------------------------------------------- documented fallbacks (no exception)

def test_draft_with_nan_logits_is_only_rejected():
    """A broken draft cannot change the output: its NaN drafts are rejected, the target decides."""
    model, ids_, mask = llama(), *prompts(2, [9, 6], seed=3)
    draft = nan_model()
    out = specdec.generate(model, ids_, mask, draft_model=draft, num_draft_tokens=3, max_new_tokens=6)
    assert torch.equal(out, hf_greedy(model, ids_, mask, 6))
    g = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    sampled = specdec.generate(model, ids_, mask, draft_model=draft, num_draft_tokens=3, max_new_tokens=6,
                               do_sample=True, generator=g())
    alone = specdec.generate(model, ids_, mask, max_new_tokens=6, do_sample=True, generator=g())
    assert torch.equal(sampled, alone)  # every draft rejected: the same draws as without a draft


def test_draft_of_another_tokenizer_stays_lossless():
    """Same vocabulary size, unrelated weights (a draft for another tokenizer): undetectable, still exact."""
    model, (ids_, mask) = llama(), prompts(1, [8], seed=5)
    out, stats = specdec.generate(model, ids_, mask, draft_model=tiny_model("llama", seed=3, layers=1),
                                  num_draft_tokens=2, max_new_tokens=6, return_stats=True)
    assert torch.equal(out, hf_greedy(model, ids_, mask, 6))


def test_eos_outside_the_vocabulary_is_ignored_like_hf():
    model, (ids_, mask) = llama(), prompts(1, [5])
    out = specdec.generate(model, ids_, mask, max_new_tokens=4, eos_token_id=500, min_new_tokens=2)
    assert torch.equal(out, hf_greedy(model, ids_, mask, 4, eos_token_id=500, min_new_tokens=2))


def test_quantize_skip_as_one_string_is_one_pattern():
    model = nn.Sequential()
    model.add_module("body", nn.Linear(64, 64))
    model.add_module("lm_head", nn.Linear(64, 8))
    quantize(model, bits=8, skip="lm_head", backend="reference")
    assert type(model.lm_head) is nn.Linear and type(model.body) is not nn.Linear


def test_patched_model_falls_back_to_hf_for_right_padding():
    model = llama()
    ids_ = prompts(2, [5, 5])[0]
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with patched(model, prompt_lookup_num_tokens=3):
            out = model.generate(ids_, attention_mask=mask, max_new_tokens=3)
            assert last_stats(model) is None  # HF's own generate ran
    assert any(issubclass(w.category, SpecdecFallbackWarning) and "padding_side" in str(w.message) for w in caught)
    assert torch.equal(out, hf_greedy(model, ids_, mask, 3))


def test_prefix_cache_sizes_may_be_integral_floats():
    cache = PrefixCache(max_bytes=2.0 ** 20, block_size=8.0, offload_bytes=0.0)
    assert (cache.max_bytes, cache.block_size, cache.offload_bytes) == (1 << 20, 8, 0)
    assert all(type(v) is int for v in (cache.max_bytes, cache.block_size, cache.offload_bytes))


def test_cache_namespace_without_a_prefix_cache_is_ignored():
    model, (ids_, mask) = llama(), prompts(1, [5])
    out = specdec.generate(model, ids_, mask, max_new_tokens=3, cache_namespace="tenant-a")
    assert torch.equal(out, hf_greedy(model, ids_, mask, 3))


def test_budget_caps_the_draft_length_at_the_end_of_a_position_table():
    """GPT-2 with prompt + max_new_tokens == n_positions: drafts never run past the table."""
    model = gpt2()
    limit = model.config.n_positions
    ids_ = prompts(1, [limit - 4])[0]
    out = specdec.generate(model, ids_, draft_model=model, num_draft_tokens=8, max_new_tokens=4)
    assert torch.equal(out, hf_greedy(model, ids_, torch.ones_like(ids_), 4))


def error_table() -> str:
    """The bad-input table of docs/errors.md, from CASES and the messages the code raises now."""
    lines = ["| API | bad input | what you get |", "|---|---|---|"]
    for case in CASES.values():
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                case.call()
        except SystemExit:
            said = [line for line in err.getvalue().splitlines() if "error: " in line or "unknown command" in line]
            what = "exit status 2: " + _short(said[-1].split("error: ")[-1] if said else "")
        except Exception as exc:  # noqa: BLE001 - the case's error, rendered
            what = f"`{type(exc).__name__}`: {_short(str(exc))}"
        else:
            what = "(no error)"
        lines.append(f"| `{case.api}` | {case.bad} | {what.replace('|', '/')} |")
    return "\n".join(lines)


def _short(text: str, width: int = 150) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 4] + " ..."


def test_docs_error_table_is_current():
    """docs/errors.md's table is this file's CASES: regenerate with `python tests/test_bad_inputs.py`."""
    doc = (Path(__file__).parent.parent / "docs" / "errors.md").read_text()
    start = doc.index("| API | bad input |")
    end = doc.index("\n\n", start)
    assert doc[start:end].splitlines() == error_table().splitlines()


if __name__ == "__main__":
    path = Path(__file__).parent.parent / "docs" / "errors.md"
    doc = path.read_text()
    start = doc.index("| API | bad input |")
    end = doc.index("\n\n", start)
    path.write_text(doc[:start] + error_table() + doc[end:])
