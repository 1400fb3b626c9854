"""hit_policy: a prefix-cache hit is used only where the prefills' timings predict it faster.

Timings are injected (the policy's own clock is never read here), so the decisions are exact.
"""

from __future__ import annotations

import pytest
import torch

import specdec
from conftest import hf_greedy, prompts, tiny_model
from prefix_cache import PrefixCache
from specdec import hit_policy
from specdec.hit_policy import NEVER, PROBE_EVERY, HitCosts, fit_line

MS = 1e-3


def _timed(misses, hits) -> HitCosts:
    """HitCosts fed ``misses`` [(tokens, ms)] and ``hits`` [(loaded, run, ms)], hits last."""
    costs = HitCosts()
    for tokens, ms in misses:
        costs.observe(0, tokens, ms * MS)
    for loaded, run, ms in hits:
        costs.observe(loaded, run, ms * MS)
    return costs


def test_fit_line_is_exact_on_a_line_and_ignores_one_outlier():
    points = [(x, 2.0 + 0.5 * x) for x in (0, 10, 20, 30, 40)]
    assert fit_line(points) == pytest.approx((2.0, 0.5))
    assert fit_line(points + [(25, 500.0)]) == pytest.approx((2.0, 0.5), rel=0.05)
    assert fit_line([(7, 3.0), (7, 5.0), (7, 4.0)]) == (4.0, 0.0)       # one length: flat
    assert fit_line([(0, 5.0), (10, 1.0)])[1] == 0.0                    # a slope is never negative


def test_launch_bound_prefill_gives_a_threshold_between_the_lengths():
    """Misses flat at ~20 ms (launch bound) + 1 us/token; hits 22 ms + 0.2 us per cached token:
    a hit pays off past (22 - 20) / (1 - 0.2) us = 2500 tokens, not at 2k, well at 8k."""
    misses = [(n, 20 + 1e-3 * n) for n in (2064, 8159, 4112)]
    hits = [(h, 16, 22 + 2e-4 * h + 1e-3 * 16) for h in (2048, 8128, 4096)]
    costs = _timed(misses, hits)
    assert costs.threshold(256) == pytest.approx(2500, abs=2)
    assert 2048 < costs.threshold(256) < 8128


@pytest.mark.parametrize("hit_ms, want", [(5.0, 0), (30.0, NEVER)])
def test_one_length_seen_compares_there(hit_ms, want):
    """Both kinds timed at one length only (slopes 0): the hit is used everywhere or nowhere."""
    costs = _timed([(2064, 20.0), (2064, 21.0)], [(2048, 16, hit_ms)])
    assert costs.threshold(256) == want


def test_the_default_until_both_kinds_are_timed_and_on_probes():
    costs = HitCosts()
    assert costs.threshold(256) == 256
    costs.observe(0, 2064, 20 * MS)
    assert costs.threshold(256) == 256                                  # no hit timed yet
    costs.observe(2048, 16, 30 * MS)
    assert costs.threshold(256) == NEVER                                # the hit lost
    for _ in range(PROBE_EVERY - 1):
        costs.observe(0, 2064, 20 * MS)                                  # prefills instead
    assert costs.threshold(256) == NEVER
    costs.observe(0, 2064, 20 * MS)
    assert costs.threshold(256) == 256                                  # a probe: time a hit again
    costs.observe(2048, 16, 10 * MS)                                     # it won this time
    assert costs.threshold(256) == NEVER                                # but one win is outvoted ...
    for _ in range(3):
        costs.observe(2048, 16, 10 * MS)
    assert costs.threshold(256) == 0                                    # ... until it holds up


def test_the_policy_is_off_on_a_cpu_and_an_explicit_min_hit_tokens_wins():
    model = tiny_model("llama")
    path = (None, None, 1, False)
    hit_policy.costs(model, path).observe(0, 80, 1 * MS)
    hit_policy.costs(model, path).observe(64, 16, 100 * MS)
    assert hit_policy.threshold(model, path, PrefixCache(1 << 20)) == 0           # CPU: every hit
    hit_policy.observe(model, path, 64, 16, 1.0)                                  # not recorded on a CPU
    assert len(hit_policy.costs(model, path).hits) == 1


def _generate(model, ids, cache, **kw):
    return specdec.generate(model, ids, max_new_tokens=8, prefix_cache=cache, return_stats=True, **kw)


@pytest.mark.parametrize("compile", [False, True])
def test_slow_hits_prefill_instead_and_fast_hits_are_used_with_identical_output(monkeypatch, compile):
    """With timings where the hit loses, generate prefills the whole prompt; where it wins, it uses
    the hit; an explicit min_hit_tokens=0 uses it whatever the timings. Same tokens every time (fp32)."""
    monkeypatch.setattr(hit_policy, "applies", lambda model: True)      # as on a GPU
    monkeypatch.setattr(hit_policy, "observe", lambda *args: None)       # only the injected timings count
    model = tiny_model("llama")
    shared = prompts(1, [64], seed=11)[0]
    first, second = (torch.cat([shared, torch.tensor([[5 + i, 6, 7]])], dim=1) for i in range(2))
    want = hf_greedy(model, second, torch.ones_like(second), 8)
    path = ("graphs" if compile else None, None, 1, False)
    cache = PrefixCache(max_bytes=64 << 20, block_size=16)
    _generate(model, first, cache, compile=compile)
    results = {}
    for name, hit_ms, min_hit in (("slow", 50.0, None), ("fast", 1.0, None), ("explicit", 50.0, 0)):
        hit_policy.forget(model)
        costs = hit_policy.costs(model, path)
        for n in (67, 200):
            costs.observe(0, n, (10 + 0.01 * n) * MS)
        for _ in range(3):
            costs.observe(64, 3, hit_ms * MS)
        cache.min_hit_tokens = min_hit
        results[name] = _generate(model, second, cache, compile=compile)
    assert [results[k][1].cached_prompt_tokens for k in ("slow", "fast", "explicit")] == [[0], [64], [64]]
    for out, _ in results.values():
        assert torch.equal(out, want)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("compile", [False, True])
def test_gpu_prefills_are_timed_and_either_choice_keeps_the_tokens(compile):
    """On a GPU every prefill is timed (misses with and without a cache, hits while the default
    threshold lets them through); whatever the timings then decide, the tokens equal an uncached call."""
    model = tiny_model("llama").cuda()
    shared = prompts(1, [512], seed=12)[0].cuda()
    cache = PrefixCache(max_bytes=64 << 20, block_size=16)
    path = ("graphs" if compile else None, None, 1, False)
    for i in range(6):
        ids = torch.cat([shared, torch.tensor([[5 + i, 6, 7]], device="cuda")], dim=1)
        plain = specdec.generate(model, ids, max_new_tokens=8, compile=compile)
        out, stats = _generate(model, ids, cache, compile=compile)
        assert torch.equal(out, plain), i
        assert stats.cached_prompt_tokens[0] in (0, 512)
    costs = hit_policy.costs(model, path)
    assert len(costs.misses) >= 2 and len(costs.hits) >= 1 and costs.learned is not None
