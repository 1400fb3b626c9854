"""verify / sampling: pure functions with injected randomness, checked against exact distributions."""

import pytest
import torch
from scipy.stats import chisquare

from specdec.sampling import SamplingConfig, probabilities, sample, warp_logits
from specdec.verify import verify, verify_greedy

V = 5


def _dist(values):
    t = torch.tensor(values, dtype=torch.float32)
    return t / t.sum()


def test_greedy_keeps_matching_prefix_and_corrects():
    logits = torch.full((1, 4, V), -1.0)
    for pos, tok in enumerate([2, 3, 1, 4]):
        logits[0, pos, tok] = 1.0
    v = verify_greedy(logits, torch.tensor([[2, 3, 0]]), torch.tensor([3]))
    assert v.num_accepted.tolist() == [2] and v.next_token.tolist() == [1]
    v = verify_greedy(logits, torch.tensor([[2, 3, 1]]), torch.tensor([3]))
    assert v.num_accepted.tolist() == [3] and v.next_token.tolist() == [4]  # bonus token


def test_greedy_respects_num_proposed():
    logits = torch.zeros(1, 3, V)
    logits[0, :, 2] = 1.0
    v = verify_greedy(logits, torch.tensor([[2, 2]]), torch.tensor([1]))
    assert v.num_accepted.tolist() == [1] and v.next_token.tolist() == [2]


def test_draft_equal_to_target_accepts_everything():
    torch.manual_seed(0)
    p = torch.softmax(torch.randn(64, 4, V), -1)
    q = p[:, :3].clone()
    drafts = sample(q, torch.rand(64, 3))
    v = verify(p, q, drafts, torch.full((64,), 3), torch.rand(64, 3) * 0.999, torch.rand(64))
    assert v.num_accepted.eq(3).all()


def test_rejection_draws_from_residual():
    p = _dist([0.5, 0.5, 0, 0, 0]).view(1, 1, V).expand(1, 2, V)
    q = _dist([0, 1, 0, 0, 0]).view(1, 1, V)
    # token 1 drafted with q=1, p=0.5: accepted iff u <= 0.5
    v = verify(p, q, torch.tensor([[1]]), torch.tensor([1]), torch.tensor([[0.9]]), torch.tensor([0.3]))
    assert v.num_accepted.tolist() == [0] and v.next_token.tolist() == [0]  # residual = onehot(0)
    v = verify(p, q, torch.tensor([[1]]), torch.tensor([1]), torch.tensor([[0.4]]), torch.tensor([0.3]))
    assert v.num_accepted.tolist() == [1]


@pytest.mark.parametrize("deterministic_draft", [False, True])
def test_first_token_distribution_is_exactly_p(deterministic_draft):
    """Monte Carlo over 200k rows at once: the emitted first token ~ p, whatever q is."""
    n = 200_000
    g = torch.Generator().manual_seed(1)
    p0 = _dist([0.05, 0.4, 0.25, 0.2, 0.1])
    q0 = _dist([0.3, 0.1, 0.3, 0.05, 0.25])
    p = torch.stack([p0, _dist([1, 1, 1, 1, 1])]).expand(n, 2, V)
    if deterministic_draft:
        q, drafts = None, torch.full((n, 1), 2)
    else:
        q = q0.view(1, 1, V).expand(n, 1, V)
        drafts = sample(q, torch.rand(n, 1, generator=g))
    v = verify(p, q, drafts, torch.ones(n, dtype=torch.long), torch.rand(n, 1, generator=g), torch.rand(n, generator=g))
    first = torch.where(v.num_accepted > 0, drafts[:, 0], v.next_token)
    counts = torch.bincount(first, minlength=V).double()
    assert chisquare(counts.numpy(), (p0 * n).double().numpy()).pvalue > 1e-3


def test_sample_inverse_cdf_edges():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0]])
    assert sample(probs, torch.tensor([0.0])).item() == 1
    assert sample(probs, torch.tensor([0.49])).item() == 1
    assert sample(probs, torch.tensor([0.51])).item() == 3
    assert sample(probs, torch.tensor([0.9999999])).item() == 3


def test_warpers_match_hf():
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    cfg = SamplingConfig(do_sample=True, temperature=0.7, top_k=20, top_p=0.8)
    ref = logits.clone()
    for warper in (TemperatureLogitsWarper(0.7), TopKLogitsWarper(20), TopPLogitsWarper(0.8)):
        ref = warper(None, ref)
    assert torch.equal(torch.isinf(ref), torch.isinf(warp_logits(logits, cfg)))
    torch.testing.assert_close(probabilities(logits, cfg), ref.softmax(-1))


@pytest.mark.parametrize("bad", [dict(temperature=0.0), dict(top_p=1.5), dict(top_k=-1), dict(min_p=2.0)])
def test_bad_sampling_settings(bad):
    with pytest.raises(ValueError):
        SamplingConfig(do_sample=True, **bad)
