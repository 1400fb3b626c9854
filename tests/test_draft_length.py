"""The adaptive draft-length controller, on synthetic acceptance and costs."""

import random

import pytest

from specdec.draft_length import AdaptiveDraftLength


def _simulate(a: float, draft_cost: float, verify_base: float, verify_per_token: float, steps: int = 300):
    ctl = AdaptiveDraftLength(k_max=8)
    rng = random.Random(0)
    for _ in range(steps):
        k = ctl.choose()
        accepted = 0
        while accepted < k and rng.random() < a:
            accepted += 1
        ctl.update(k, [accepted], [k], k * draft_cost, verify_base + verify_per_token * (k + 1))
    return ctl


def _true_best(a, draft_cost, verify_base, verify_per_token):
    def rate(k):
        return (1 - a ** (k + 1)) / (1 - a) / (k * draft_cost + verify_base + verify_per_token * (k + 1))
    return max(range(0, 9), key=rate), rate


@pytest.mark.parametrize("a, c, base, per", [(0.9, 0.05, 1.0, 0.02), (0.6, 0.1, 1.0, 0.05),
                                             (0.3, 0.5, 1.0, 0.0), (0.95, 0.0, 1.0, 0.1)])
def test_controller_finds_a_near_optimal_k(a, c, base, per):
    ctl = _simulate(a, c, base, per)
    best, rate = _true_best(a, c, base, per)
    if best > 0:  # at k = 0 only the occasional probe measures acceptance
        assert abs(ctl.acceptance - a) < 0.12
    assert rate(ctl._k) >= 0.95 * rate(best)


def test_per_step_draft_cost_favours_long_drafts():
    # prompt lookup: drafting costs the same whatever k, so a decent acceptance should push k up
    ctl = AdaptiveDraftLength(k_max=8)
    rng = random.Random(1)
    for _ in range(300):
        k = ctl.choose()
        accepted = 0
        while accepted < k and rng.random() < 0.7:
            accepted += 1
        ctl.update(k, [accepted], [k], 0.1, 1.0 + 0.01 * k, step_s=1.1 + 0.01 * k)
    assert ctl._k >= 6


def test_useless_draft_turns_drafting_off():
    ctl = _simulate(0.05, 1.0, 1.0, 0.0)
    assert ctl._k == 0


def test_k_max_validated():
    with pytest.raises(ValueError):
        AdaptiveDraftLength(k_max=0)
