"""Tiny random models built from configs (no downloads), shared by the tests."""

from __future__ import annotations

import os
import threading

import pytest
import torch
import transformers

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

VOCAB = 96


@pytest.fixture(autouse=True)
def _controllers_start_afresh():
    """Each test starts with no draft-length controller memory, and no prefill timings, from an earlier
    test's calls."""
    from specdec import hit_policy, learned

    learned.forget()
    hit_policy.forget()
    yield


def _cfg(name: str):
    small = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    if name == "llama":
        return transformers.LlamaConfig(**small)
    if name == "qwen2":
        return transformers.Qwen2Config(**small)
    if name == "mistral":
        return transformers.MistralConfig(**small, sliding_window=None)
    if name == "gemma":
        return transformers.GemmaConfig(**small, head_dim=16)
    if name == "phi3":
        return transformers.Phi3Config(**{**small, "num_key_value_heads": 4}, pad_token_id=0)
    if name == "gpt2":
        return transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=3, n_head=4, n_positions=512)
    if name == "opt":
        return transformers.OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=3,
                                      num_attention_heads=4, max_position_embeddings=512, word_embed_proj_dim=64,
                                      pad_token_id=1)
    if name == "gpt_neox":
        return transformers.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                          num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=512)
    raise KeyError(name)


ARCHS = ["llama", "qwen2", "mistral", "gemma", "phi3", "gpt2", "opt", "gpt_neox"]


def tiny_model(arch: str = "llama", seed: int = 0, layers: int | None = None) -> torch.nn.Module:
    """A seeded random causal LM of the given architecture, fp32, eval mode.

    Weights are scaled up so the logits are peaked (like a trained model's), which keeps
    argmax near-ties (where fp32 rounding could flip a greedy token) rare.
    """
    config = _cfg(arch)
    if layers is not None:
        for attr in ("num_hidden_layers", "n_layer"):
            if hasattr(config, attr):
                setattr(config, attr, layers)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(4.0)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


@pytest.fixture(scope="session")
def llama():
    return tiny_model("llama")


def prompts(batch: int, lengths: list[int], seed: int = 1, vocab: int = VOCAB):
    """Left-padded random prompts: (input_ids, attention_mask)."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(batch, width, dtype=torch.long)
    mask = torch.zeros(batch, width, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, width - n:] = torch.randint(3, vocab, (n,), generator=g)
        mask[i, width - n:] = 1
    return ids, mask


def hf_greedy(model, ids, mask, max_new_tokens, **kw):
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False, **kw)


def default_model_available() -> bool:
    try:
        from integrations.models import default_gguf_path

        default_gguf_path()
        return True
    except FileNotFoundError:
        return False


def run_in_threads(work, n: int, timeout: float) -> None:
    """Run ``work(i)`` for i in 0..n-1 in n threads; fail on a hang (deadlock) or on any exception."""
    errors: list[BaseException] = []

    def guarded(i: int) -> None:
        try:
            work(i)
        except BaseException as exc:  # noqa: BLE001 - re-raised by the calling thread
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)
    assert not any(t.is_alive() for t in threads), f"threads did not finish in {timeout} s (deadlock?)"
    assert not errors, errors[0]
