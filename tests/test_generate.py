"""specdec.generate against HF generate on tiny random models of many architectures."""

import pytest
import torch
from scipy.stats import chisquare

import specdec
from conftest import ARCHS, VOCAB, hf_greedy, prompts, tiny_model
from specdec.sampling import SamplingConfig, probabilities


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_identical_to_hf_for_every_k(arch):
    target = tiny_model(arch)
    draft = tiny_model(arch, seed=7, layers=1)
    for length in (1, 7, 30):
        ids, mask = prompts(1, [length], seed=length)
        ref = hf_greedy(target, ids, mask, 24)
        for k in range(1, 9):
            out = specdec.generate(target, ids, mask, draft_model=draft, num_draft_tokens=k, max_new_tokens=24)
            assert torch.equal(out, ref), (arch, length, k)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_batch8_left_padded_identical_to_hf_batched(arch):
    target = tiny_model(arch)
    ids, mask = prompts(8, [3, 17, 9, 1, 25, 12, 6, 20], seed=3)
    ref = hf_greedy(target, ids, mask, 20)
    for drafter in (dict(draft_model=tiny_model(arch, seed=5, layers=1)), dict(draft_model="self:1"),
                    dict(prompt_lookup_num_tokens=4), {}):
        out = specdec.generate(target, ids, mask, max_new_tokens=20, **drafter)
        assert torch.equal(out, ref), (arch, drafter)


def test_batch_rows_stop_at_eos_independently(llama):
    ids, mask = prompts(6, [4, 9, 2, 14, 7, 11], seed=11)
    free = hf_greedy(llama, ids, mask, 30)
    eos = int(free[2, ids.shape[1] + 3])  # a token row 2 emits early: rows finish at different times
    ref = hf_greedy(llama, ids, mask, 30, eos_token_id=eos, pad_token_id=0)
    out = specdec.generate(llama, ids, mask, draft_model="self:1", num_draft_tokens=3, max_new_tokens=30,
                           eos_token_id=eos, pad_token_id=0)
    assert torch.equal(out, ref)


def test_draft_equal_to_target_accepts_all_and_cuts_forwards(llama):
    ids, mask = prompts(1, [10])
    for k in (1, 4, 7):
        out, stats = specdec.generate(llama, ids, mask, draft_model=llama, num_draft_tokens=k,
                                      max_new_tokens=64, return_stats=True)
        assert torch.equal(out, hf_greedy(llama, ids, mask, 64))
        assert stats.acceptance_rate == 1.0
        # 63 tokens after the prefill's first one, k+1 per verify pass
        assert stats.target_forwards == -(-63 // (k + 1))


def test_plain_decoding_without_draft(llama):
    ids, mask = prompts(3, [5, 8, 2])
    out, stats = specdec.generate(llama, ids, mask, max_new_tokens=16, return_stats=True)
    assert torch.equal(out, hf_greedy(llama, ids, mask, 16))
    assert stats.acceptance_rate == 0.0 and stats.k_history == [0] * 15


def test_prompt_lookup_accepts_on_repetitive_text(llama):
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12] * 6])
    out, stats = specdec.generate(llama, ids, prompt_lookup_num_tokens=8, max_new_tokens=40, return_stats=True)
    assert torch.equal(out, hf_greedy(llama, ids, torch.ones_like(ids), 40))


def test_min_new_tokens_and_eos(llama):
    ids, mask = prompts(1, [6])
    free = hf_greedy(llama, ids, mask, 20)
    eos = int(free[0, 6 + 2])
    for kw in (dict(eos_token_id=eos), dict(eos_token_id=[eos, 1], min_new_tokens=5)):
        ref = hf_greedy(llama, ids, mask, 20, **kw)
        out = specdec.generate(llama, ids, mask, draft_model="self:2", num_draft_tokens=4, max_new_tokens=20, **kw)
        assert torch.equal(out, ref), kw


def test_max_length_and_generation_config(llama):
    from transformers import GenerationConfig

    ids, mask = prompts(1, [6])
    gc = GenerationConfig(max_length=15, do_sample=False, pad_token_id=0)
    out = specdec.generate(llama, ids, mask, generation_config=gc, prompt_lookup_num_tokens=3)
    assert torch.equal(out, llama.generate(ids, attention_mask=mask, generation_config=gc))
    out = specdec.generate(llama, ids, mask, max_new_tokens=5, return_dict_in_generate=True, use_cache=False)
    assert out.sequences.shape == (1, 11)


def _exact_two_token_marginals(model, prompt, cfg):
    """Target distribution of new token 1 and (marginal) new token 2."""
    with torch.no_grad():
        p1 = probabilities(model(prompt).logits[:, -1], cfg)[0]
        support = p1.nonzero().flatten()
        ext = torch.cat([prompt.expand(len(support), -1), support[:, None]], dim=1)
        p2_given = probabilities(model(ext).logits[:, -1], cfg)
    return p1, (p1[support, None] * p2_given).sum(0)


def _chi2_pvalue(samples, expected_probs):
    n = len(samples)
    counts = torch.bincount(samples, minlength=len(expected_probs)).double()
    expected = expected_probs.double() * n
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum(0, keepdim=True)])
    exp = torch.cat([expected[big], expected[~big].sum(0, keepdim=True)])
    keep = exp > 0
    return chisquare(obs[keep].numpy(), exp[keep].numpy() * obs[keep].sum().item() / exp[keep].sum().item()).pvalue


@pytest.mark.parametrize("settings", [dict(temperature=1.0), dict(temperature=0.7, top_k=12, top_p=0.9)])
@pytest.mark.parametrize("drafter", ["model", "lookup"])
def test_sampling_preserves_target_distribution(settings, drafter):
    target = tiny_model("llama", seed=3)
    with torch.no_grad():
        target.get_output_embeddings().weight.mul_(0.3)  # flatter: many tokens in play
    prompt = torch.tensor([[4, 9, 4, 9, 4, 9, 4]])
    n = 6000
    extra = dict(draft_model=tiny_model("llama", seed=8, layers=1)) if drafter == "model" else dict(
        prompt_lookup_num_tokens=3)
    out = specdec.generate(target, prompt.expand(n, -1), do_sample=True, max_new_tokens=2, num_draft_tokens=2,
                           generator=torch.Generator().manual_seed(0), **settings, **extra)
    cfg = SamplingConfig(do_sample=True, **settings)
    p1, p2 = _exact_two_token_marginals(target, prompt, cfg)
    assert _chi2_pvalue(out[:, -2], p1) > 1e-3
    assert _chi2_pvalue(out[:, -1], p2) > 1e-3


def test_sampling_is_reproducible_with_a_generator(llama):
    # a fixed k: "auto" picks k from measured timings, which differ run to run
    ids, mask = prompts(2, [5, 9])
    runs = [specdec.generate(llama, ids, mask, do_sample=True, draft_model="self:1", max_new_tokens=12,
                             num_draft_tokens=3,
                             generator=torch.Generator().manual_seed(42)) for _ in range(2)]
    assert torch.equal(*runs)


def test_adaptive_k_is_recorded_and_bounded(llama):
    ids, mask = prompts(1, [10])
    _, stats = specdec.generate(llama, ids, mask, prompt_lookup_num_tokens=6, max_new_tokens=40, return_stats=True)
    assert len(stats.k_history) == stats.target_forwards and max(stats.k_history) <= 6


def test_streamer_sees_the_final_text_in_order(llama):
    class Recorder:
        def __init__(self):
            self.chunks, self.ended = [], False

        def put(self, value):
            self.chunks.append(value.flatten().tolist())

        def end(self):
            self.ended = True

    ids, mask = prompts(1, [7])
    rec = Recorder()
    out = specdec.generate(llama, ids, mask, prompt_lookup_num_tokens=4, max_new_tokens=25, streamer=rec)
    assert rec.ended and rec.chunks[0] == ids[0].tolist()
    assert sum(rec.chunks[1:], []) == out[0, 7:].tolist()


def test_early_exit_model_shares_weights(llama):
    draft = specdec.early_exit_model(llama, 1)
    assert len(draft.model.layers) == 1 and len(llama.model.layers) == 3
    assert draft.lm_head.weight is llama.lm_head.weight
    assert draft.model.layers[0] is llama.model.layers[0]


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_draft_tokens=0, draft_model="self:1"), "num_draft_tokens"),
    (dict(num_draft_tokens=-2, draft_model="self:1"), "num_draft_tokens"),
    (dict(num_draft_tokens="fast", draft_model="self:1"), "num_draft_tokens"),
    (dict(prompt_lookup_num_tokens=0), "prompt_lookup_num_tokens"),
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(max_new_tokens=None, max_length=2), "max_new_tokens"),
    (dict(draft_model="self:9"), "num_layers"),
    (dict(draft_model="tiny"), "self:N"),
    (dict(kv_quant="int3"), "kv_quant"),
    (dict(stop_strings=["x"]), "tokenizer"),
    (dict(num_beams=2), "num_beams"),
    (dict(do_sample=True, temperature=0.0), "temperature"),
])
def test_bad_arguments_raise_clear_errors(llama, kwargs, match):
    ids, mask = prompts(1, [5])
    with pytest.raises(ValueError, match=match):
        specdec.generate(llama, ids, mask, **{"max_new_tokens": 4, **kwargs})


def test_bad_inputs(llama):
    with pytest.raises(ValueError, match="empty"):
        specdec.generate(llama, torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        specdec.generate(llama, torch.zeros(1, 4))
    with pytest.raises(ValueError, match="vocabulary"):
        specdec.generate(llama, torch.tensor([[1, VOCAB + 5]]))
    with pytest.raises(ValueError, match="all zeros"):
        specdec.generate(llama, torch.ones(1, 3, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="shape"):
        specdec.generate(llama, torch.ones(1, 3, dtype=torch.long), torch.ones(1, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="unexpected keyword"):
        specdec.generate(llama, torch.ones(1, 3, dtype=torch.long), max_new_token=3)


def test_draft_vocabulary_smaller_than_target_is_refused(llama):
    import transformers

    small = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB // 2, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1)).eval()
    with pytest.raises(ValueError, match="vocabulary"):
        specdec.generate(llama, torch.ones(1, 3, dtype=torch.long), draft_model=small)


def test_self_draft_of_an_accelerate_dispatched_model():
    """device_map models carry accelerate hooks bound to the original modules: the early-exit
    copy must run its own (shorter) layer list, not the original's."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    model = tiny_model("llama")
    add_hook_to_module(model, AlignDevicesHook(io_same_device=True))
    add_hook_to_module(model.model, AlignDevicesHook(io_same_device=True))
    for layer in model.model.layers:
        add_hook_to_module(layer, AlignDevicesHook())
    ids, mask = prompts(1, [9])
    out = specdec.generate(model, ids, mask, draft_model="self:1", num_draft_tokens=2, max_new_tokens=12)
    assert torch.equal(out, hf_greedy(model, ids, mask, 12))
