"""The adaptive draft-length controller, on simulated drafts and costs (no model)."""

import math
import random

import pytest
import torch

from specdec.draft_length import AdaptiveDraftLength, Calibration, FixedDraftLength, StepRecord


def _simulate(ctl, accept, confidence, plain_s=1.0, forward_s=0.3, verify_s=1.0, verify_per=0.1,
              per_forward=True, tokens=600, seed=0, prompt=0, catch_up_per_token=0.0):
    """Decode ``tokens`` with ``ctl`` driving; returns (tokens per second, speculative steps).

    ``accept(conf)``: the chance the target accepts a token drafted with confidence conf;
    ``confidence(rng)``: a drafted token's confidence. A draft model first catches up on what
    it has not seen (the ``prompt``, then each plain stretch) at ``catch_up_per_token`` seconds.
    """
    rng, clock, produced, spec_steps, unseen = random.Random(seed), 0.0, 0, 0, prompt
    while produced < tokens:
        stretch = min(ctl.plain_steps(unseen if per_forward else 0), tokens - produced)
        if stretch:
            clock += stretch * plain_s
            produced += stretch
            unseen += stretch
            ctl.observe_plain(stretch, stretch * plain_s)
            continue
        catch_up, slots, unseen = unseen * catch_up_per_token, unseen, 0
        clock += catch_up
        confs, limit = [], ctl.draft_limit()
        for j in range(limit):
            confs.append(confidence(rng))
            if ctl.stops_early and j + 1 < limit and not ctl.keep_drafting(torch.tensor([confs])):
                break
        draft = forward_s * len(confs) if per_forward else forward_s
        n = ctl.verify_length(torch.tensor([confs]), [len(confs)], draft)
        accepted = 0
        while accepted < n and rng.random() < accept(confs[accepted]):
            accepted += 1
        verify = verify_s + verify_per * n
        clock += draft + verify
        produced += accepted + 1
        spec_steps += 1
        ctl.update(StepRecord(n, len(confs) if per_forward else 0, [accepted], [n], torch.tensor([confs]),
                              draft, verify, draft + verify, catch_up_s=catch_up,
                              catch_up_slots=slots if catch_up else 0))
    return produced / clock, spec_steps


def _calls(ctl, n_calls, **kw):
    """Short calls one after another, each resuming what the last learned (as specdec.learned
    does); returns the mean tokens per second of the calls after the first, and the controller."""
    rates = []
    for call in range(n_calls):
        rate, _ = _simulate(ctl, seed=call, **kw)
        rates.append(rate)
        ctl = ctl.resume()
    return sum(rates[1:]) / (n_calls - 1), ctl


def test_a_useless_draft_costs_at_most_a_few_percent():
    ctl = AdaptiveDraftLength(k_max=12)
    rate, spec_steps = _simulate(ctl, accept=lambda c: 0.02, confidence=lambda rng: rng.uniform(0.0, 1.0))
    assert rate >= 0.95 * 1.0            # plain decoding makes 1 token/s here
    assert spec_steps < 60               # only probes


def test_a_useless_draft_costs_little_even_in_a_short_call():
    ctl = AdaptiveDraftLength(k_max=12)
    rate, _ = _simulate(ctl, accept=lambda c: 0.02, confidence=lambda rng: rng.uniform(0.0, 1.0), tokens=64)
    assert rate >= 0.93


def test_useless_prompt_lookup_on_a_cpu_like_device_turns_itself_off():
    # lookup costs little to draft, but every verified token costs 10% of a step (a CPU)
    ctl = AdaptiveDraftLength(k_max=10, per_forward=False)
    rate, _ = _simulate(ctl, accept=lambda c: 0.05, confidence=lambda rng: 0.35, forward_s=0.01,
                        per_forward=False)
    assert rate >= 0.95


def test_a_good_draft_speculates_far():
    ctl = AdaptiveDraftLength(k_max=12)
    rate, spec_steps = _simulate(ctl, accept=lambda c: 0.85, confidence=lambda rng: 0.9, forward_s=0.1,
                                 verify_per=0.02)
    assert rate >= 2.4                  # the best fixed k makes 2.61 here
    assert spec_steps > 100


def test_confidence_stopping_beats_a_fixed_length_on_a_mixed_draft():
    # half the tokens are sure (accepted 95%), half are guesses (accepted 10%)
    def confidence(rng):
        return 0.97 if rng.random() < 0.7 else 0.15

    def accept(c):
        return 0.95 if c > 0.9 else 0.1

    auto, _ = _simulate(AdaptiveDraftLength(k_max=12), accept, confidence, forward_s=0.3)
    fixed, _ = _simulate(FixedDraftLength(8), accept, confidence, forward_s=0.3)
    assert auto > 1.1 * fixed


def test_calibration_learns_what_confidence_means():
    cal = Calibration()
    for _ in range(200):
        cal.update([0.95, 0.95], accepted=0, judged=2)   # confident but always wrong
    assert cal.chance(0.95) < 0.1
    for _ in range(200):
        cal.update([0.3, 0.3, 0.3], accepted=3, judged=3)  # unsure but always right
    assert cal.chance(0.3) > 0.9
    assert cal.chances([0.3, 0.3]) == pytest.approx([cal.chance(0.3), cal.chance(0.3) ** 2])


def test_verify_length_is_zero_when_no_token_is_likely():
    ctl = AdaptiveDraftLength()
    ctl.observe_plain(4, 4.0)
    for _ in range(50):
        ctl.calibration.update([0.35], accepted=0, judged=1)
    assert ctl.verify_length(torch.tensor([[0.35] * 5]), [5], 0.0) == 0
    assert ctl.verify_length(None, [3, 5], 0.0) == 5


def test_fixed_length_verifies_all_it_proposed():
    ctl = FixedDraftLength(6)
    assert ctl.plain_steps() == 0 and ctl.draft_limit() == 6 and not ctl.stops_early
    assert ctl.verify_length(None, [2, 4], 0.0) == 4


@pytest.mark.parametrize("kw", [dict(probe_share=0.0), dict(probe_share=1.5), dict(hopeless=-0.1), dict(margin=1.0),
                                dict(min_stretch=0), dict(min_stretch=256), dict(max_priced_stretch=64)])
def test_switch_settings_validated(kw):
    with pytest.raises(ValueError, match="must"):
        AdaptiveDraftLength(**kw)


def test_k_max_validated():
    with pytest.raises(ValueError):
        AdaptiveDraftLength(k_max=0)


def test_a_draft_model_reports_its_catch_up_apart():
    """The draft's prompt (or slots run while speculation was off) is timed apart from drafting."""
    from conftest import prompts, tiny_model
    from specdec.drafters import ModelDrafter
    from specdec.state import SlotBatch

    model = tiny_model("llama")
    ids, mask = prompts(1, [12], seed=1)
    batch = SlotBatch(ids[:, :-1], mask[:, :-1], ids[:, -1], torch.arange(1), torch.zeros(1, dtype=torch.long))
    drafter = ModelDrafter(model, model.config.vocab_size)
    first = drafter.propose(batch, 2, lambda logits, j: (logits.argmax(-1), None))
    assert first.catch_up_s > 0 and first.forwards == 2
    drafter.rollback(batch.num_slots)
    batch.pending = first.tokens[:, 0]
    again = drafter.propose(batch, 2, lambda logits, j: (logits.argmax(-1), None))
    assert again.catch_up_s == 0.0


def test_a_dear_draft_stays_off_across_short_calls():
    # a draft whose catch-up on a 200-token prompt costs 4 plain steps, and which never matches:
    # after the first call, later 48-token calls decode (almost) plainly
    kw = dict(accept=lambda c: 0.02, confidence=lambda rng: rng.uniform(0.0, 1.0), forward_s=0.35,
              tokens=48, prompt=200, catch_up_per_token=0.02)
    rate, _ = _calls(AdaptiveDraftLength(k_max=12), 30, **kw)
    assert rate >= 0.95


def test_a_second_losing_probe_is_priced_by_its_catch_up():
    ctl = AdaptiveDraftLength(k_max=12)
    ctl.observe_plain(3, 3.0)                       # 1 s a plain step

    def losing_probe(catch_up_s: float) -> None:
        ctl.update(StepRecord(4, 4, [0], [4], torch.full((1, 4), 0.5), 1.4, 1.4, 2.8, catch_up_s=catch_up_s))

    losing_probe(6.0)
    assert ctl.plain_steps() == ctl.min_stretch     # a first loss may be bad luck: a short stretch
    ctl.observe_plain(ctl.min_stretch, float(ctl.min_stretch))
    losing_probe(6.0)
    # the second cost 6 s of catch-up + 1.8 s lost: off for >= 7.8 / 0.03 steps
    assert ctl.plain_steps() >= 7.8 / ctl.probe_share - 1
    ctl.observe_plain(100, 100.0)                   # the call ended 100 steps into the stretch
    assert ctl.resume().plain_steps() == ctl.plain_steps() > 0


def test_after_a_loss_a_probe_waits_until_its_catch_up_is_cheap():
    ctl = AdaptiveDraftLength(k_max=12)
    ctl.observe_plain(3, 3.0)                       # 1 s a plain step
    # a losing probe that caught up on 100 slots in 2 s: 0.02 s a slot
    ctl.update(StepRecord(4, 4, [0], [4], torch.full((1, 4), 0.5), 1.4, 1.4, 2.8, catch_up_s=2.0,
                          catch_up_slots=100))
    assert ctl.plain_steps() == ctl.min_stretch     # lost badly: off for a first, short stretch
    ctl.observe_plain(ctl.min_stretch, float(ctl.min_stretch))
    assert ctl.plain_steps(lag=0) == 0              # nothing to catch up on: probe
    # a new call's 500-token prompt costs 10 s: a probe waits for 10 / 0.03 plain seconds in all
    waited = ctl.min_stretch
    assert ctl.plain_steps(lag=500) == math.ceil(500 * 0.02 / ctl.probe_share) - waited
    ctl.observe_plain(400, 400.0)
    assert ctl.plain_steps(lag=500) == 0


def test_a_draft_that_has_not_lost_probes_whatever_its_catch_up():
    ctl = AdaptiveDraftLength(k_max=12)
    ctl.observe_plain(3, 3.0)
    ctl.update(StepRecord(4, 4, [4], [4], torch.full((1, 4), 0.9), 0.4, 1.0, 1.4, catch_up_s=2.0,
                          catch_up_slots=100))
    assert ctl.plain_steps(lag=10_000) == 0


def test_a_good_draft_keeps_winning_across_calls():
    kw = dict(accept=lambda c: c, confidence=lambda rng: rng.uniform(0.7, 1.0), forward_s=0.1,
              tokens=64, prompt=100, catch_up_per_token=0.001)
    rate, ctl = _calls(AdaptiveDraftLength(k_max=12), 10, **kw)
    assert rate >= 2.0 and ctl.plain_steps() == 0


def test_what_a_call_learned_reaches_the_next_call_on_the_same_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    import specdec
    from specdec import learned

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(3, 96, (1, 12))
    kw = dict(max_new_tokens=12, do_sample=False, prompt_lookup_num_tokens=4)
    first = specdec.generate(model, ids, **kw)
    (entry,) = learned._BY_TARGET[model].values()
    second = specdec.generate(model, ids, **kw)
    assert torch.equal(first, second)
    (again,) = learned._BY_TARGET[model].values()
    assert again[1] is not entry[1]                   # the second call ran a resumed copy
    learned.forget(model)
    assert model not in learned._BY_TARGET


def test_forget_refuses_what_is_not_a_model():
    from specdec import learned

    with pytest.raises(TypeError, match="target model"):
        learned.forget("my-model")
