"""Verification: which drafted tokens the target keeps, and the token after them.

Pure tensor functions with the randomness passed in. Notation follows Leviathan et
al. (2023): ``p`` is the TARGET's distribution, ``q`` the DRAFT's (HF's
`_speculative_sampling` uses the same letters).

Shapes: B rows, k drafted positions, V vocabulary.
    draft_tokens (B, k)   tokens the drafter proposed
    num_proposed (B,)     how many of the k are real (prompt lookup may find fewer);
                          positions at or past it are treated as rejected
    p (B, k+1, V)         target distribution at each drafted position plus one bonus
    q (B, k, V)           draft distribution each token was drawn from
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from specdec.sampling import greedy, sample

BROKEN = -1  # next_token of a row whose target distribution was NaN/inf: the caller must raise


class Verdict(NamedTuple):
    num_accepted: torch.Tensor  # (B,) long: leading drafted tokens kept, 0..num_proposed
    next_token: torch.Tensor    # (B,) long: the target's token after them; BROKEN on NaN/inf scores


def _leading_true(ok: torch.Tensor) -> torch.Tensor:
    """(B, k) bool -> (B,) number of leading True values."""
    return ok.long().cumprod(-1).sum(-1)


def _proposed_mask(num_proposed: torch.Tensor, k: int) -> torch.Tensor:
    return torch.arange(k, device=num_proposed.device) < num_proposed.unsqueeze(-1)


def verify_greedy(target_logits: torch.Tensor, draft_tokens: torch.Tensor,
                  num_proposed: torch.Tensor) -> Verdict:
    """Greedy verification: keep drafts while they equal the target's argmax.

    target_logits: (B, k+1, V). The next token is the target's argmax at the first
    mismatch (or after the last draft), so output equals plain greedy decoding. A position
    whose scores hold NaN/inf rejects its draft and, as the next token, gives ``BROKEN``.
    """
    k = draft_tokens.shape[1]
    choice = greedy(target_logits, BROKEN)  # (B, k+1)
    ok = (choice[:, :k] == draft_tokens) & _proposed_mask(num_proposed, k)
    n = _leading_true(ok)
    return Verdict(n, choice.gather(1, n.unsqueeze(1)).squeeze(1))


def verify(p: torch.Tensor, q: torch.Tensor | None, draft_tokens: torch.Tensor,
           num_proposed: torch.Tensor, accept_uniforms: torch.Tensor,
           draw_uniforms: torch.Tensor) -> Verdict:
    """Speculative rejection sampling (lossless: outputs are distributed as ``p``).

    Draft token x_j is kept with probability min(1, p_j(x_j) / q_j(x_j)); at the first
    rejection the next token is drawn from norm(max(p_j - q_j, 0)), and after k
    acceptances from p_k (the bonus token).

    q: (B, k, V), or None for a deterministic drafter (prompt lookup), which is the
       same as q one-hot at the drafted token.
    accept_uniforms: (B, k) in [0, 1); draw_uniforms: (B,) in [0, 1), or (B, k+1) to
    draw at the first rejected position with that position's uniform.
    NaN in p rejects the draft there (NaN comparisons are false), and the next token is then
    ``BROKEN``; NaN in q (a broken draft) only rejects: the token comes from p.
    """
    k = draft_tokens.shape[1]
    p_draft = p[:, :k].gather(-1, draft_tokens.unsqueeze(-1)).squeeze(-1)  # (B, k)
    q_draft = _draft_prob(q, draft_tokens)
    ok = (accept_uniforms * q_draft <= p_draft) & (p_draft > 0) & _proposed_mask(num_proposed, k)
    n = _leading_true(ok)
    residual = _residual(p, q, draft_tokens, n, num_proposed)
    if draw_uniforms.dim() == 2:
        draw_uniforms = draw_uniforms.gather(1, n.unsqueeze(1)).squeeze(1)
    return Verdict(n, sample(residual, draw_uniforms, invalid=BROKEN))


def _draft_prob(q: torch.Tensor | None, draft_tokens: torch.Tensor) -> torch.Tensor:
    if q is None:
        return torch.ones(draft_tokens.shape, device=draft_tokens.device)
    return q.gather(-1, draft_tokens.unsqueeze(-1)).squeeze(-1)


def _residual(p: torch.Tensor, q: torch.Tensor | None, draft_tokens: torch.Tensor,
              n: torch.Tensor, num_proposed: torch.Tensor) -> torch.Tensor:
    """(B, V) distribution of the token after the n kept drafts."""
    rows = torch.arange(p.shape[0], device=p.device)
    p_n = p[rows, n]  # (B, V)
    rejected = n < num_proposed  # else: all proposals kept, draw the bonus from p_n
    if not bool(rejected.any()):
        return p_n
    k = draft_tokens.shape[1]
    at = n.clamp(max=max(k - 1, 0))
    if q is None:
        q_n = torch.zeros_like(p_n).scatter_(-1, draft_tokens[rows, at].unsqueeze(-1), 1.0)
    else:
        q_n = q[rows, at]
    diff = (p_n - q_n).clamp_(min=0)
    total = diff.sum(-1, keepdim=True)
    # p == q up to rounding leaves no mass; p itself is then the right distribution.
    diff = torch.where(total > 0, diff / total.clamp(min=1e-30), p_n)
    return torch.where(rejected.unsqueeze(-1), diff, p_n)
