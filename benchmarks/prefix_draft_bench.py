"""Prefix cache with a draft model: prefill the draft, or give it blocks of its own?

For each shared-prefix length L: prompt = L tokens of real text + a 16-token question (a new
one per repeat, so only the prefix is cached). Three ways to run the same calls:
  none:      specdec.generate without a prefix cache
  prefilled: PrefixCache(cache_drafts=False): the target's K/V comes from the cache, the draft
             model runs over the whole prompt in its first forward (the old behaviour)
  own:       PrefixCache(cache_drafts=True): the draft's K/V comes from blocks of its own too,
             its first forward runs only the question
Both caches are warmed by one call on the prefix first. Each call is generate(max_new_tokens=8,
num_draft_tokens=4, greedy), median of --repeats (modes interleaved, so machine noise hits all
alike), timed three ways by a streamer:
  ttft_ms:        to the first new token (the target's prefill)
  first_step_ms:  to the end of the first speculative step (draft catch-up + k drafts + verify)
  call_ms:        the whole call (including storing the finished row in the cache)
Outputs must be equal across the modes (checked per call).

    OMP_NUM_THREADS=1 python -m benchmarks.prefix_draft_bench       # CPU, bundled default model
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import specdec
from specdec.prefix_cache import PrefixCache

from . import report
from .prefix_bench import text_ids

MODES = ("none", "prefilled", "own")
SUFFIX = 16


class _StepTimes:
    """Streamer noting when each put arrives: the prompt's, the first token's, the first step's."""

    def __init__(self) -> None:
        self.at: list[float] = []

    def put(self, value) -> None:
        self.at.append(time.perf_counter())

    def end(self) -> None:
        pass


def timed_call(model, ids: torch.Tensor, draft, cache, settings: dict) -> tuple[dict, torch.Tensor]:
    """({ttft_ms, first_step_ms, call_ms}, output ids) of one generate() call."""
    streamer = _StepTimes()
    start = time.perf_counter()
    out = specdec.generate(model, ids, draft_model=draft, prefix_cache=cache, streamer=streamer, **settings)
    end = time.perf_counter()
    ms = lambda i: 1e3 * (streamer.at[i] - start) if len(streamer.at) > i else None  # noqa: E731
    return dict(ttft_ms=ms(1), first_step_ms=ms(2), call_ms=1e3 * (end - start)), out


def draft_first_forward_tokens(model, ids, draft, cache, settings: dict) -> int:
    """Tokens the draft model's first forward of a call runs (its catch-up over the prompt)."""
    seen, original = [], draft.forward

    def forward(*args, **kwargs):
        seen.append(kwargs["input_ids"].shape[1])
        return original(*args, **kwargs)

    draft.forward = forward
    try:
        specdec.generate(model, ids, draft_model=draft, prefix_cache=cache, **settings)
    finally:
        del draft.forward
    return seen[0]


def measure_length(model, tok, draft, length: int, repeats: int, settings: dict) -> dict:
    vocab = model.get_input_embeddings().weight.shape[0]
    prefix = text_ids(tok, length, vocab)
    questions = [text_ids(None, SUFFIX + i, vocab)[-SUFFIX:] for i in range(repeats + 2)]
    make = lambda q: torch.tensor([prefix + q])  # noqa: E731
    caches = {"none": None, "prefilled": PrefixCache(max_bytes=8 << 30, cache_drafts=False),
              "own": PrefixCache(max_bytes=8 << 30, cache_drafts=True)}
    for mode in MODES:                                   # warm: fill the caches, first-call costs
        timed_call(model, make(questions[0]), draft, caches[mode], settings)
    first_forward = {mode: draft_first_forward_tokens(model, make(questions[1]), draft, caches[mode], settings)
                     for mode in MODES}
    samples = {mode: [] for mode in MODES}
    outputs_equal = True
    for q in questions[2:]:
        outs = []
        for mode in MODES:
            times, out = timed_call(model, make(q), draft, caches[mode], settings)
            samples[mode].append(times)
            outs.append(out)
        outputs_equal &= all(torch.equal(outs[0], o) for o in outs[1:])
    row = dict(shared_tokens=length, prompt_tokens=length + SUFFIX, outputs_equal=outputs_equal,
               draft_first_forward_tokens=first_forward)
    for mode in MODES:
        for key in ("ttft_ms", "first_step_ms", "call_ms"):
            values = [s[key] for s in samples[mode] if s[key] is not None]
            row[f"{key[:-3]}_{mode}_ms"] = statistics.median(values) if values else None
        row[f"samples_{mode}"] = samples[mode]
    for key in ("first_step", "call"):
        own, pre, none = (row[f"{key}_{m}_ms"] for m in ("own", "prefilled", "none"))
        row[f"{key}_own_vs_prefilled_speedup"] = pre / own
        row[f"{key}_own_vs_none_speedup"] = none / own
    return row


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--draft", default="distilled", help="'distilled' (shipped layered draft) or 'self:N'")
    p.add_argument("--lengths", default="512,2048", help="shared prefix lengths in tokens")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--num-draft-tokens", type=int, default=4, help="fixed k, so every mode does the same steps")
    p.add_argument("--out", default="benchmarks/results/cpu/prefix-draft-cpu.json")
    args = p.parse_args(argv)
    from specdec.integrations.models import load_default
    from specdec.options import resolve_draft

    model, tok = load_default(dtype="float32", device="cpu")
    draft_name = args.draft
    try:
        draft = resolve_draft(draft_name, model)    # the module draft_model=draft_name runs
    except (ValueError, OSError) as err:
        print(f"draft {draft_name!r} did not load ({err}); using self:4", file=sys.stderr)
        draft_name, draft = "self:4", resolve_draft("self:4", model)
    if not isinstance(draft, torch.nn.Module) or not hasattr(draft, "get_input_embeddings"):
        raise SystemExit(f"draft {draft_name!r} is not a causal LM draft (a feature draft keeps prefilling)")
    settings = dict(max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens,
                    num_draft_tokens=args.num_draft_tokens, do_sample=False)
    start = time.perf_counter()
    rows = []
    for length in (int(x) for x in args.lengths.split(",")):
        rows.append(measure_length(model, tok, draft, length, args.repeats, settings))
        print(json.dumps({k: v for k, v in rows[-1].items() if not k.startswith("samples")}), flush=True)
    result = dict(
        benchmark="prefix_draft_bench", environment=report.environment(),
        command="OMP_NUM_THREADS=1 python -m benchmarks.prefix_draft_bench " + " ".join(argv or sys.argv[1:]),
        model="bundled default (SmolLM2-135M-Instruct), float32, CPU",
        draft=dict(name=draft_name, layers=draft.config.num_hidden_layers),
        settings=dict(settings, suffix_tokens=SUFFIX, repeats=args.repeats, statistic="median",
                      block_size=16, greedy=True, modes=dict(
                          none="no prefix cache", prefilled="PrefixCache(cache_drafts=False): draft prefilled",
                          own="PrefixCache(cache_drafts=True): draft K/V from its own blocks")),
        rows=rows, wall_s=round(time.perf_counter() - start, 1))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
