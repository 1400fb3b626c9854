"""Where a draft misses: its top-1 agreement with the target on copied vs novel target tokens.

Teacher-forced on the target's greedy continuations of every held-out ``code`` and ``chat``
prompt (what greedy acceptance depends on): a target token is *copied* when it completes an
n-gram (default 4 tokens) that occurs in the prompt, else *novel*. A draft that misses mostly
novel tokens needs better language modelling (text, capacity), one that misses copied tokens
needs to attend further back (long rows).

    python -m benchmarks.draft_misses --draft specdec/drafts/smollm2-135m-instruct-L6.safetensors \
        --out benchmarks/results/cpu/draft-misses.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from . import report


def copied_mask(prompt: list[int], continuation: list[int], n: int = 4) -> list[bool]:
    """Per continuation token: does it complete an ``n``-gram that occurs in ``prompt``?"""
    if n < 1:
        raise ValueError(f"n must be >= 1 (tokens of the prompt n-gram a copied token completes), got {n}")
    grams = {tuple(prompt[i:i + n]) for i in range(len(prompt) - n + 1)}
    context = prompt + continuation
    return [tuple(context[len(prompt) + j - n + 1:len(prompt) + j + 1]) in grams for j in range(len(continuation))]


@torch.no_grad()
def top1_by_kind(draft, prompt: list[int], continuation: list[int], n: int = 4) -> dict[str, list[int]]:
    """{"copied": [draft top-1 hits, tokens], "novel": [...]} over ``continuation`` (teacher-forced)."""
    device = draft.get_input_embeddings().weight.device
    ids = torch.tensor([prompt + continuation], device=device)
    guess = draft(input_ids=ids).logits[0, len(prompt) - 1:-1].argmax(-1).tolist()  # slot s guesses token s+1
    out = {"copied": [0, 0], "novel": [0, 0]}
    for g, token, copied in zip(guess, continuation, copied_mask(prompt, continuation, n)):
        hits = out["copied" if copied else "novel"]
        hits[0] += int(g == token)
        hits[1] += 1
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--draft", required=True, help="a layered draft file (.safetensors, as shipped)")
    p.add_argument("--ngram", type=int, default=4, help="tokens of prompt n-gram a copied token completes")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--out", type=Path, required=True, help="JSON file to write")
    args = p.parse_args(argv)

    from specdec.integrations.models import load_model
    from specdec.distill import data, evaluate, shipped

    target, tok = load_model(None, dtype="float32", device="cpu")
    draft = shipped.load_shipped_draft(target, args.draft)
    rows = {}
    for name, prompts in data.held_out_prompts().items():
        held = evaluate.greedy_eval_set(target, name, data.encode_prompts(prompts, tok), args.max_new_tokens)
        total = {"copied": [0, 0], "novel": [0, 0]}
        for prompt, continuation in zip(held.prompts, held.continuations):
            for kind, (hits, n) in top1_by_kind(draft, prompt, continuation, args.ngram).items():
                total[kind][0] += hits
                total[kind][1] += n
        rows[name] = {kind: dict(tokens=n, draft_top1=hits / max(n, 1)) for kind, (hits, n) in total.items()}
        print(name, {k: f"{v['draft_top1']:.3f} of {v['tokens']}" for k, v in rows[name].items()}, flush=True)
    result = {"environment": report.environment(),
              "command": "python -m benchmarks.draft_misses " + " ".join(argv if argv is not None else sys.argv[1:]),
              "settings": dict(draft=args.draft, ngram=args.ngram, max_new_tokens=args.max_new_tokens,
                               dtype="float32", device="cpu", teacher_forced=True),
              "workloads": rows}
    report.write_json(result, args.out)
    return result


if __name__ == "__main__":
    main()
