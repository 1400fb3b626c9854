"""benchmarks.workloads: real, deterministic prompts of the intended lengths."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import workloads as W
from benchmarks.workloads import WORKLOADS, Prompt, chat_sessions, encode, get_workload, session_prompts

ROOT = Path(__file__).resolve().parents[1]


def _body(p: Prompt) -> str:
    return p.text if p.text is not None else "\n".join(m["content"] for m in p.messages)


def test_shipped_data_is_small_and_sourced():
    data_dir = ROOT / "benchmarks" / "data"
    assert sum(f.stat().st_size for f in data_dir.iterdir()) < 200_000
    readme = (data_dir / "README.md").read_text()
    assert "PSF" in readme and "pydoc_data" in readme


@pytest.mark.parametrize("name", WORKLOADS)
def test_workload_shape_and_real_text(name):
    wl = get_workload(name)
    assert wl.name == name and wl.description and "\n" not in wl.description
    assert wl.max_new_tokens > 0 and len(wl.prompts) >= 4
    assert len({p.name for p in wl.prompts}) == len(wl.prompts)
    for p in wl.prompts:
        assert p.name.startswith(name + "/")
        assert (p.messages is None) != (p.text is None)
        body = _body(p)
        assert len(body) > (60 if name == "general" else 200)
        assert "lorem" not in body.lower()
        if p.messages is not None:
            assert all(set(m) == {"role", "content"} and m["content"] for m in p.messages)
            assert p.messages[-1]["role"] == "user"
    assert wl.suits_prompt_lookup == (name in ("code", "summarize"))


def test_determinism_in_a_fresh_process():
    code = ("from benchmarks.workloads import *; import json; "
            "print(json.dumps({w: get_workload(w).fingerprint for w in WORKLOADS}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "123", "PATH": "/usr/bin:/bin"})
    assert json.loads(out.stdout) == {w: get_workload(w).fingerprint for w in WORKLOADS}
    assert get_workload("chat").prompts == get_workload("chat").prompts
    assert chat_sessions() == chat_sessions()


def test_code_prompts_are_stubs_cut_after_the_docstring():
    import ast

    wl = get_workload("code")
    assert len(wl.prompts) == 8
    for p in wl.prompts:
        src = p.text
        tree = ast.parse(src)  # imports + def with docstring only: parses, body is the docstring
        fn = tree.body[-1]
        assert isinstance(fn, ast.FunctionDef) and fn.name == p.name.rsplit(".", 1)[-1]
        assert len(fn.body) == 1 and ast.get_docstring(fn)
    chat = get_workload("code", chat=True)
    assert chat.prompts[0].messages[0]["content"].startswith("Complete this Python function:")
    assert wl.prompts[0].text in chat.prompts[0].messages[0]["content"]


def test_chat_shares_the_system_prompt():
    wl = get_workload("chat")
    system = wl.prompts[0].messages[0]["content"]
    assert len(system) > 4000
    assert {p.messages[0]["content"] for p in wl.prompts} == {system}
    assert all(p.shared_prefix_chars == len(system) for p in wl.prompts)
    assert len({p.messages[1]["content"] for p in wl.prompts}) == len(wl.prompts)
    assert all(p.messages[1]["content"].endswith("?") for p in wl.prompts)


def test_summarize_and_long_end_with_their_instruction():
    for p in get_workload("summarize").prompts:
        assert p.messages[-1]["content"].endswith(W.SUMMARIZE_INSTRUCTION)
    long = get_workload("long")
    sizes = [len(_body(p)) for p in long.prompts]
    assert sizes == sorted(sizes) and sizes[0] > 30_000
    for p in long.prompts:
        assert "\nQuestion: " in p.messages[-1]["content"]
    # each long prompt starts at a different page: no shared prefix between them
    starts = {_body(p)[:300] for p in long.prompts}
    assert len(starts) == len(long.prompts)


def test_n_prompts_and_errors():
    assert len(get_workload("code", 3).prompts) == 3
    assert get_workload("code", 3).prompts == get_workload("code").prompts[:3]
    assert len(get_workload("long", 1).prompts) == 1
    with pytest.raises(KeyError):
        get_workload("nope")
    with pytest.raises(ValueError):
        get_workload("chat", 0)
    with pytest.raises(ValueError):
        get_workload("summarize", 1000)


def test_chat_sessions_structure():
    sessions = chat_sessions(n_turns=4, n_sessions=3)
    assert len(sessions) == 3
    system = sessions[0][0]["content"]
    for conv in sessions:
        assert conv[0] == {"role": "system", "content": system}
        roles = [m["role"] for m in conv[1:]]
        assert roles == ["user", "assistant"] * 3 + ["user"]
        prompts = session_prompts(conv)
        assert len(prompts) == 4
        for k, p in enumerate(prompts, 1):
            assert p.messages == conv[:2 * k] and p.messages[-1]["role"] == "user"
            assert p.shared_prefix_chars == len(system)
        assert all(len(m["content"]) < 600 for m in conv[1:])
    assert sessions[0][1] != sessions[1][1]  # different questions per session


class _FakeTok:
    """Character-level tokenizer without a chat template."""

    chat_template = None

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": ([0] if add_special_tokens else []) + [ord(c) % 256 for c in text]}


def test_encode_without_template_and_truncation():
    tok = _FakeTok()
    p = get_workload("chat").prompts[0]
    ids = encode(p, tok)
    text = "".join(chr(i) for i in ids[1:])
    assert text.startswith("System: You are PyRef") and text.endswith("Assistant:")
    assert p.messages[1]["content"] in text
    cut = encode(p, tok, max_tokens=1000)
    assert 900 <= len(cut) <= 1000
    cut_text = "".join(chr(i) for i in cut[1:])
    assert cut_text.startswith("System: You are PyRef") and cut_text.endswith(p.messages[1]["content"] + "\n\nAssistant:")
    raw = get_workload("code").prompts[0]
    assert len(encode(raw, tok)) == len(raw.text) + 1
    assert len(encode(raw, tok, max_tokens=50)) <= 50
    assert p.messages[0]["content"] == get_workload("chat").prompts[0].messages[0]["content"]  # not mutated


@pytest.fixture(scope="module")
def tokenizer():
    from conftest import default_model_available

    if not default_model_available():
        pytest.skip("default model not installed")
    from transformers import AutoTokenizer

    from integrations.models import default_model_dir

    return AutoTokenizer.from_pretrained(str(default_model_dir()))


@pytest.mark.slow
def test_token_lengths_with_smollm2(tokenizer):
    lengths = {w: [len(encode(p, tokenizer)) for p in get_workload(w).prompts] for w in WORKLOADS}
    assert all(100 <= n <= 400 for n in lengths["code"]), lengths["code"]
    assert all(1000 <= n <= 2200 for n in lengths["chat"]), lengths["chat"]
    assert all(1000 <= n <= 3200 for n in lengths["summarize"]), lengths["summarize"]
    assert all(8000 <= n <= 16384 for n in lengths["long"]), lengths["long"]
    assert lengths["long"] == sorted(lengths["long"])
    chat = get_workload("chat").prompts
    shared = W.shared_prefix_tokens(chat, tokenizer)
    assert 1000 <= shared < min(lengths["chat"])
    # chat template applied: the prompt ends with the assistant header
    assert tokenizer.decode(encode(chat[0], tokenizer)).endswith("<|im_start|>assistant\n")
    for conv in chat_sessions():
        ls = [len(encode(p, tokenizer)) for p in session_prompts(conv)]
        assert ls == sorted(ls) and ls[0] >= 1000


@pytest.mark.slow
def test_encode_truncates_with_real_template(tokenizer):
    p = get_workload("long", 1).prompts[0]
    ids = encode(p, tokenizer, max_tokens=2048)
    assert 1800 <= len(ids) <= 2048
    text = tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system") and text.endswith("<|im_start|>assistant\n")
    assert W.LONG_QUESTIONS["formatstrings"] in text


def test_prose_and_general_are_varied_and_held_out_of_distillation():
    from specdec.distill import data

    prose, general = get_workload("prose"), get_workload("general")
    assert len(prose.prompts) >= 5 and len(general.prompts) >= 8
    assert all(p.text is not None for p in prose.prompts)  # raw continuation by default
    assert all(p.messages is not None for p in general.prompts)  # chat-templated like `chat`
    assert get_workload("prose", chat=True).prompts[0].messages is not None
    assert prose.fingerprint != get_workload("prose", 5).fingerprint
    sentences = [_body(p).split(". ")[0][-60:] for p in prose.prompts + general.prompts]
    training = [str(p.messages or p.text) for p in data.training_prompts(40)]
    training += data.plain_texts(200_000)
    for s in sentences:
        assert not any(s in t for t in training), s
