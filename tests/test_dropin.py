"""The drop-in path gets every option: patch() and a patched model's per-call keywords accept what
specdec.generate accepts (one options module), compile=True included, and pipelines give their
unpatched output."""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
from transformers.generation.streamers import BaseStreamer

import specdec
from conftest import default_model_available, hf_greedy, prompts, tiny_model
from integrations import SpecdecFallbackWarning, last_stats, patch, unpatch
from prefix_cache import PrefixCache
from specdec import options

# a valid, non-default value for every option of specdec.generate
EXAMPLES = {
    "draft_model": lambda: "self:1",
    "num_draft_tokens": lambda: 2,
    "prompt_lookup_num_tokens": lambda: 3,
    "prefix_cache": lambda: PrefixCache(max_bytes=1 << 22),
    "cache_namespace": lambda: "tenant",
    "kv_quant": lambda: "int8",
    "compile": lambda: True,
    "generator": lambda: torch.Generator().manual_seed(0),
    "return_stats": lambda: True,
}
HF_OWN = {"model", "input_ids", "attention_mask", "assistant_model", "streamer", "tokenizer", "generation_config",
          "hf_kwargs"}


def test_generate_takes_exactly_the_options_module_s_options():
    params = set(inspect.signature(specdec.generate).parameters) - HF_OWN
    assert params == set(options.OPTIONS)
    assert set(EXAMPLES) == set(options.OPTIONS), "add an example value for each new option"


@pytest.mark.parametrize("name", options.OPTIONS)
def test_every_option_works_in_generate_patch_and_per_call(name):
    model = tiny_model("llama")
    ids, mask = prompts(2, [6, 9], seed=3)
    ref = hf_greedy(model, ids, mask, 8)

    def tokens(out):
        return out[0] if isinstance(out, tuple) else out

    value = EXAMPLES[name]
    assert torch.equal(tokens(specdec.generate(model, ids, mask, max_new_tokens=8, **{name: value()})), ref)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SpecdecFallbackWarning)
        patch(model, **{name: value()})
        out = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
        assert torch.equal(tokens(out), ref)
        assert isinstance(out, tuple) == (name == "return_stats")
        unpatch(model)
        patch(model)
        out = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, **{name: value()})
        assert torch.equal(tokens(out), ref)
    assert last_stats(model) is not None
    unpatch(model)


@pytest.mark.parametrize("bad, error, message", [
    (dict(compile="fast"), ValueError, "compile must be False, True, 'graphs' or 'inductor'"),
    (dict(draft_model="tiny"), ValueError, "a string must be 'self:N'"),
    (dict(generator=7), TypeError, "generator must be a torch.Generator"),
    (dict(return_stats="yes"), TypeError, "return_stats must be True or False"),
    (dict(prefix_caches=None), TypeError, "unexpected keyword argument 'prefix_caches'"),
])
def test_patch_refuses_what_generate_refuses_with_the_same_message(bad, error, message):
    model = tiny_model("llama")
    ids, mask = prompts(1, [5])
    with pytest.raises(error, match=message):
        patch(model, **bad)
    if "prefix_caches" not in bad:
        with pytest.raises(error, match=message):
            specdec.generate(model, ids, mask, max_new_tokens=2, **bad)


def test_a_pipeline_cannot_be_patched_to_return_stats():
    import transformers

    model = tiny_model("llama")
    pipe = transformers.pipeline("text-generation", model=model, tokenizer=_tokenizer_stub(model))
    with pytest.raises(ValueError, match="last_stats"):
        patch(pipe, return_stats=True)


def test_patch_distilled_loads_the_draft_once():
    if not default_model_available():
        pytest.skip("default model not installed")
    from integrations import load_default

    model, _ = load_default()
    patch(model, draft_model="distilled")
    draft = vars(model)["generate"].settings.options.draft_model
    assert isinstance(draft, torch.nn.Module)
    unpatch(model)


def test_compile_batch_sizes_share_one_power_of_two_runner():
    from specdec import static

    model = tiny_model("llama")
    for rows in (3, 4, 2):
        ids, mask = prompts(rows, [5, 9, 7, 4][:rows], seed=rows)
        out = specdec.generate(model, ids, mask, max_new_tokens=10, compile=True, draft_model="self:1")
        assert torch.equal(out, hf_greedy(model, ids, mask, 10))
    batches = {key[2] for key in static._RUNNERS if key[0] == id(model) and key[1] == "target"}
    assert batches == {2, 4}


# ---------------------------------------------------------------- the default model and pipelines

needs_default = pytest.mark.skipif(not default_model_available(), reason="default model not installed")
CHATS = [[{"role": "user", "content": "Write a Python function that reverses a string."}],
         [{"role": "user", "content": "Name three rivers in Europe."}],
         [{"role": "user", "content": "What is 12 times 7?"}]]


@pytest.fixture(scope="module")
def default():
    from integrations import load_default

    return load_default()


def _pipeline(model, tok):
    import transformers

    return transformers.pipeline("text-generation", model=model, tokenizer=tok, device=model.device)


@pytest.mark.slow
@needs_default
def test_patched_model_with_compile_and_distilled_draft_equals_unpatched(default):
    model, tok = default
    text = tok.apply_chat_template(CHATS[0], tokenize=False, add_generation_prompt=True)
    inputs = tok(text, return_tensors="pt")
    ref = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    patch(model, compile=True, draft_model="distilled")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", SpecdecFallbackWarning)
            assert torch.equal(model.generate(**inputs, max_new_tokens=24, do_sample=False), ref)
        assert last_stats(model).drafter == "model"
        patch(model, prompt_lookup_num_tokens=8)                      # per-call compile=True instead
        assert torch.equal(model.generate(**inputs, max_new_tokens=24, do_sample=False, compile=True), ref)
    finally:
        unpatch(model)


class _Collect(BaseStreamer):
    def __init__(self):
        self.chunks = []

    def put(self, value):
        self.chunks.append(value.reshape(-1).tolist())

    def end(self):
        pass


@pytest.mark.slow
@needs_default
def test_patched_chat_pipeline_gives_the_unpatched_text(default):
    model, tok = default
    pipe = _pipeline(model, tok)
    kw = dict(max_new_tokens=20, do_sample=False, return_full_text=False)
    single = pipe(CHATS[0], **kw)
    batch = pipe(CHATS, batch_size=2, **kw)
    plain_stream = _Collect()
    pipe(CHATS[1], streamer=plain_stream, **kw)
    patch(pipe, compile=True, draft_model="distilled")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", SpecdecFallbackWarning)
            assert pipe(CHATS[0], **kw) == single
            assert pipe(CHATS, batch_size=2, **kw) == batch
            stream = _Collect()
            pipe(CHATS[1], streamer=stream, **kw)
            assert sum(stream.chunks[1:], []) == sum(plain_stream.chunks[1:], [])
            full = pipe(CHATS[2], max_new_tokens=8, do_sample=False)          # return_full_text default
            assert full[0]["generated_text"][:-1] == CHATS[2]
            sampled = pipe(CHATS[2], max_new_tokens=8, do_sample=True, temperature=0.7)
            assert sampled[0]["generated_text"]
    finally:
        unpatch(pipe)


def _tokenizer_stub(model):
    """A tiny word-level tokenizer for a tiny model (only needed to build a pipeline object)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(model.config.vocab_size)}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="w0", pad_token="w0")
