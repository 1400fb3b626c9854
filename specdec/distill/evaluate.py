"""How often a draft's guesses are accepted: a cheap exact replay, and a real decode.

Greedy speculative decoding accepts a drafted token when it equals the target's greedy
token, and every accepted token leaves the draft on the target's own path. So the
acceptance of a greedy run can be *replayed* from one teacher-forced forward of the draft
over the target's greedy continuation (:func:`replay_acceptance`): no decode loop, one
batched forward, exact up to floating-point rounding. :func:`measure_acceptance` runs
``specdec.generate`` for real (the number the final report quotes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class EvalSet:
    """Held-out prompts and the target's greedy continuations of them."""

    name: str                       # e.g. "code", "chat"
    prompts: list[list[int]]        # token ids per prompt
    continuations: list[list[int]]  # the target's greedy new tokens per prompt (EOS included if hit)
    max_new_tokens: int | None = None  # the budget they were generated with (None: their longest length)


def left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention_mask), both (B, max_len), rows aligned on the right."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return ids.to(device), mask.to(device)


def greedy_eval_set(target, name: str, prompts: list[list[int]], max_new_tokens: int,
                    batch_size: int = 8) -> EvalSet:
    """The target's greedy continuations of ``prompts`` (batched ``specdec.generate``, no draft)."""
    import specdec

    device = target.get_input_embeddings().weight.device
    continuations = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        ids, mask = left_pad(chunk, 0, device)
        out, stats = specdec.generate(target, ids, mask, max_new_tokens=max_new_tokens, do_sample=False,
                                      return_stats=True)
        new = out[:, ids.shape[1]:].tolist()
        continuations += [row[:n] for row, n in zip(new, stats.new_tokens)]
    return EvalSet(name, [list(p) for p in prompts], continuations, max_new_tokens)


def simulate(matches: list[bool], k: int, limit: int | None = None) -> tuple[int, int]:
    """(accepted, proposed) of greedy speculation with draft length ``k`` along one continuation.

    ``matches[j]``: the draft's argmax before new token j equals it (j >= 1; matches[0],
    the prefill's token, is ignored). Mirrors ``specdec.generate`` run with
    ``max_new_tokens=limit`` (default ``len(matches)``): each step drafts min(k, budget
    left - 1), keeps the matching prefix, and the target adds one token; drafts past
    the continuation's end (its EOS) are rejected.
    """
    total = len(matches)
    return simulate_chains([matches[j + 1: j + 1 + k] for j in range(total)], k, limit)


def simulate_chains(hits: list[list[bool]], k: int, limit: int | None = None) -> tuple[int, int]:
    """:func:`simulate` for drafts whose guess depends on its depth within the step.

    ``hits[j][d]``: in a step whose pending token is new token j, the draft's (d+1)-th token
    equals new token j + d + 1. ``len(hits)`` = new tokens; missing entries count as misses.
    """
    accepted = proposed = 0
    pos, total = 1, len(hits)
    limit = total if limit is None else limit
    while pos < total:
        kk = min(k, limit - pos - 1)
        if kk <= 0:
            break
        row, n = hits[pos - 1], 0
        while n < kk and pos + n < total and n < len(row) and row[n]:
            n += 1
        accepted, proposed, pos = accepted + n, proposed + kk, pos + n + 1
    return accepted, proposed


@torch.no_grad()
def replay_acceptance(draft, eval_set: EvalSet, k: int = 4, batch_size: int = 4,
                      autocast_dtype: torch.dtype | None = None) -> float:
    """Greedy acceptance rate (accepted / proposed drafts) of ``draft`` on ``eval_set``, replayed."""
    device = draft.get_input_embeddings().weight.device
    accepted = proposed = 0
    rows = list(zip(eval_set.prompts, eval_set.continuations))
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        ids, mask = left_pad([p + c for p, c in chunk], 0, device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            guess = draft(input_ids=ids, attention_mask=mask, position_ids=positions).logits.argmax(-1)  # (B, T)
        width = ids.shape[1]
        for i, (_, cont) in enumerate(chunk):
            n = len(cont)
            # the logits before new token j sit at column width - n - 1 + j
            predicted = guess[i, width - n - 1: width - 1].tolist()
            a, p = simulate([g == t for g, t in zip(predicted, cont)], k, eval_set.max_new_tokens)
            accepted, proposed = accepted + a, proposed + p
    return accepted / proposed if proposed else 0.0


def measure_acceptance(target, draft, prompts: list[list[int]], k: int = 4, max_new_tokens: int = 128,
                       batch_size: int = 8) -> dict:
    """Run ``specdec.generate`` (greedy, fixed draft length ``k``) and count accepted drafts.

    Returns ``{"acceptance_rate", "mean_prompt_acceptance", "tokens_per_step", "per_prompt",
    "accepted", "proposed", "new_tokens"}``; the rate pools all prompts' drafts.
    """
    import specdec

    device = target.get_input_embeddings().weight.device
    accepted, proposed, steps, new = [], [], [], []
    for start in range(0, len(prompts), batch_size):
        ids, mask = left_pad(prompts[start:start + batch_size], 0, device)
        _, stats = specdec.generate(target, ids, mask, draft_model=draft, num_draft_tokens=k, do_sample=False,
                                    max_new_tokens=max_new_tokens, return_stats=True)
        accepted += stats.accepted
        proposed += stats.proposed
        steps += stats.steps
        new += stats.new_tokens
    per_prompt = [a / p if p else None for a, p in zip(accepted, proposed)]
    rated = [r for r in per_prompt if r is not None]
    return dict(acceptance_rate=sum(accepted) / max(sum(proposed), 1),
                mean_prompt_acceptance=sum(rated) / len(rated) if rated else None,
                tokens_per_step=sum(max(n - 1, 0) for n in new) / max(sum(steps), 1),
                per_prompt=per_prompt, accepted=sum(accepted), proposed=sum(proposed), new_tokens=sum(new))


def acceptance_by_workload(target, draft, prompts: dict[str, list[list[int]]], k: int = 4,
                           max_new_tokens: int = 128, batch_size: int = 16) -> dict:
    """:func:`measure_acceptance` per workload (``{name: prompts}``), plus ``"mean"``: the mean of
    the workloads' pooled rates."""
    out = {w: measure_acceptance(target, draft, ids, k=k, max_new_tokens=max_new_tokens, batch_size=batch_size)
           for w, ids in prompts.items()}
    out["mean"] = sum(r["acceptance_rate"] for r in out.values()) / len(prompts)
    return out
